"""One consumer: read → own? → batch → process → write atomically → account.

Three threads, each with one job: the subscriber drains the socket (so Redis never sees a slow
subscriber), the heartbeat keeps us in the group and follows its membership, and this loop
processes and writes. Reading never waits for handlers or writes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from processor.config import Settings
from processor.connection import CONNECTION_ERRORS, Outage, command_client
from processor.handlers import Failure, Runner, load_handler, make_runner
from processor.inbox import Inbox
from processor.keys import Keys
from processor.membership import Membership, new_consumer_id, now_ms
from processor.messages import Entry, Message, handler_failed, output_entry, parse
from processor.ownership import PartitionedStrategy, RaceStrategy, make_strategy
from processor.stats import ConsumerStats
from processor.subscriber import Gap, Subscriber
from processor.writer import Writer

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
DEFAULT_HANDLER = "processor.handlers:add_random_score"
BACKLOG_CHECK_S = 1.0
BACKLOG_WARN_REPEAT_S = 10.0
GAPS_MAXLEN = 10_000


class Consumer:
    """A member of the group. ``run()`` blocks until ``stop`` is set, then flushes and leaves."""

    def __init__(
        self,
        settings: Settings,
        slot: int = 0,
        stats: ConsumerStats | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self.stats = stats
        self.stop = stop or threading.Event()
        self.keys = Keys.from_settings(settings)
        self.consumer_id = new_consumer_id(slot)
        self._fenced = threading.Event()
        self._takeovers: deque[list[bytes]] = deque()
        self._own_gaps: deque[Gap] = deque()
        self._inbox = Inbox()
        self._membership_lock = threading.Lock()
        self._members: frozenset[str] = frozenset()
        self._unwritten: list[Entry] = []
        self._totals = {"written": 0, "dead": 0, "skipped": 0, "taken_over": 0, "lost": 0}

    @property
    def context(self) -> str:
        return f"[{self.consumer_id} pid={os.getpid()}]"

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> None:
        self._set_up()
        try:
            self._join()
            while not self.stop.is_set():
                self._step()
            self._flush()
        finally:
            self._tear_down()

    def _set_up(self) -> None:
        settings = self.settings
        handler = load_handler(settings.handler)
        # The built-in handler cannot hang: skip the two timer syscalls per message.
        timeout_s = 0.0 if settings.handler == DEFAULT_HANDLER else settings.handler_timeout_s
        self._runner: Runner = make_runner(handler, timeout_s, settings.handler_concurrency)
        self._client = command_client(settings, name="processor-consumer")
        # The heartbeat has its own connection, so a slow script call never delays it.
        self._heartbeat_client = command_client(settings, name="processor-heartbeat")
        self._writer = Writer(
            self._client,
            self.keys,
            settings.lock_ttl_ms,
            settings.reconnect_backoff_max_s,
            self.context,
            stop=self.stop,
            grace_s=settings.shutdown_grace_s * 0.5,
        )
        self._membership = Membership(self._heartbeat_client, self.keys, settings.heartbeat_ttl_ms)
        self._strategy: RaceStrategy | PartitionedStrategy = make_strategy(
            settings.strategy, settings.takeover_buffer_ms / 1000, settings.takeover_buffer_max
        )
        self._subscriber = Subscriber(
            settings,
            deliver=self._route,
            on_gap=self._own_gaps.append,
            context=self.context,
            backoff_max_s=settings.reconnect_backoff_max_s,
        )
        self._heartbeat_outage = Outage("Redis (heartbeat)", self.context)
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="heartbeat", daemon=True
        )
        self._parent_pid = os.getppid()
        self._gaps_seen = f"{now_ms()}-0"

    def _join(self) -> None:
        """Subscribes first, then registers: a listed consumer is always a subscribed one."""
        self._subscriber.start()
        while not self._subscriber.subscribed.wait(0.1):
            if self.stop.is_set():
                return
        self._register(self.consumer_id)
        self._heartbeat.start()
        log.info(
            "%s consumer ready: channel=%s strategy=%s",
            self.context,
            self.keys.channel,
            self._strategy.name,
        )

    def _register(self, consumer_id: str) -> None:
        while not self.stop.is_set():
            try:
                with self._membership_lock:
                    self._membership.register(consumer_id)
                    self.consumer_id = consumer_id
                    self._publish_id()
                    self._beat_locked()
                return
            except CONNECTION_ERRORS as error:
                self._heartbeat_outage.failed(error)
                self.stop.wait(0.2)

    def _publish_id(self) -> None:
        if self.stats is not None:
            self.stats.consumer_id = self.consumer_id

    def _step(self) -> None:
        if self._fenced.is_set():
            self._rejoin()
        while self._takeovers:
            self._take_over(self._takeovers.popleft())
        payloads = self._inbox.take(
            self.settings.processing_batch_size, self.settings.batch_window_ms / 1000, IDLE_WAIT_S
        )
        if payloads:
            self._handle(payloads)
        self._account()

    def _flush(self) -> None:
        """After a stop request: stop reading, write everything already received, leave."""
        stopping_since = time.monotonic()
        self._subscriber.stop()
        self._subscriber.join(timeout=5)
        margin_s = self.settings.heartbeat_ttl_ms / 1000
        leftovers = self._strategy.leaving(stopping_since - margin_s)
        if leftovers:
            self._takeovers.append(leftovers)
        while self._takeovers:
            self._take_over(self._takeovers.popleft())
        pending = self._inbox.drain()
        size = self.settings.processing_batch_size
        for start in range(0, len(pending), size):
            self._handle(pending[start : start + size])
        self._account()

    def _tear_down(self) -> None:
        self.stop.set()
        self._subscriber.stop()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=2)
        try:
            with self._membership_lock:
                self._membership.deregister()
        except CONNECTION_ERRORS as error:
            log.warning(
                "%s could not deregister (%s): the heartbeat expiry will", self.context, error
            )
        self._runner.close()
        totals = self._totals
        log.info(
            "%s consumer stopped: written=%d dead=%d skipped=%d taken_over=%d lost=%d gaps=%d",
            self.context,
            totals["written"],
            totals["dead"],
            totals["skipped"],
            totals["taken_over"],
            totals["lost"],
            self._subscriber.gaps,
        )

    # -- the hot path -------------------------------------------------------------------------

    def _route(self, chunk: list[bytes]) -> None:
        """Called by the subscriber thread for every socket read."""
        owned = self._strategy.split(chunk, time.monotonic())
        if owned:
            self._inbox.put(owned)

    def _handle(self, payloads: Sequence[bytes], skip_written: bool = False) -> None:
        """Validates, processes and writes one batch, in the order received."""
        max_bytes = self.settings.max_message_bytes
        entries: list[Entry | None] = []
        messages: list[tuple[int, Message]] = []
        for payload in payloads:
            parsed = parse(payload, max_bytes)
            if isinstance(parsed, Message):
                messages.append((len(entries), parsed))
                entries.append(None)
            else:
                entries.append(parsed)
        if skip_written:
            entries, messages = self._without_written(entries, messages)
        if messages:
            results = self._runner.run([message.body for _, message in messages])
            for (position, message), result in zip(messages, results, strict=True):
                if isinstance(result, Failure):
                    entries[position] = handler_failed(message, result.reason, max_bytes)
                else:
                    entries[position] = output_entry(message, result, max_bytes)
        self._write([entry for entry in entries if entry is not None])

    def _write(self, entries: list[Entry]) -> None:
        if not entries:
            return
        result = self._writer.write(entries, self.consumer_id, self._membership.token)
        if result is None:
            self._totals["lost"] += len(entries)
            log.error(
                "%s Redis still unreachable at shutdown: %d received messages not written",
                self.context,
                len(entries),
            )
            return
        if result.fenced:
            # We were declared dead while stalled; _rejoin decides what happens to these.
            self._unwritten.extend(entries)
            self._fenced.set()
            return
        self._totals["written"] += result.written
        self._totals["dead"] += result.dead
        self._totals["skipped"] += result.skipped
        if self.stats is not None:
            self.stats.add("written", result.written)
            self.stats.add("dead", result.dead)
            self.stats.add("skipped", result.skipped)

    def _account(self) -> None:
        if self.stats is not None:
            self.stats.set(
                received=self._subscriber.received,
                gaps=self._subscriber.gaps,
                buffered=getattr(self._strategy, "buffered", 0),
            )

    # -- takeover and rejoin ------------------------------------------------------------------

    def _take_over(self, payloads: list[bytes]) -> None:
        """Tries messages another consumer may have missed; the lock skips any it wrote."""
        self._totals["taken_over"] += len(payloads)
        if self.stats is not None:
            self.stats.add("taken_over", len(payloads))
        size = self.settings.processing_batch_size
        for start in range(0, len(payloads), size):
            self._handle(payloads[start : start + size], skip_written=True)

    def _without_written(
        self, entries: list[Entry | None], messages: list[tuple[int, Message]]
    ) -> tuple[list[Entry | None], list[tuple[int, Message]]]:
        """Drops what is already locked, so a takeover runs the handler only where needed."""
        by_position = dict(messages)
        lock_ids = [
            by_position[position].message_id if entry is None else entry.lock_id
            for position, entry in enumerate(entries)
        ]
        try:
            locked = self._client.mget([self.keys.lock(lock_id) for lock_id in lock_ids])
        except CONNECTION_ERRORS:
            return entries, messages  # the write will retry, and its locks still decide
        kept_entries: list[Entry | None] = []
        kept_messages: list[tuple[int, Message]] = []
        for position, (entry, lock) in enumerate(zip(entries, locked, strict=True)):
            if lock is not None:
                continue
            if entry is None:
                kept_messages.append((len(kept_entries), by_position[position]))
            kept_entries.append(entry)
        return kept_entries, kept_messages

    def _rejoin(self) -> None:
        """We were declared dead (stalled past the heartbeat TTL): rejoin under a new id.

        What we hold was received before or during the stall. If another consumer has been live
        since before the stall, it took over our share; and if the stall was long enough for
        locks to expire (half the dedup window), writing what we hold could duplicate it, so we
        drop it along with the socket's unread backlog. Otherwise we write it: the locks skip
        whatever was written by someone else.
        """
        old_id = self.consumer_id
        stalled_ms = now_ms() - self._membership.last_beat_ms
        view = self._membership.read()
        covered = any(
            registered < self._membership.last_beat_ms
            for member, registered in view.members.items()
            if member != old_id
        )
        if covered and stalled_ms * 2 >= self.settings.lock_ttl_ms:
            self._subscriber.reset()
            while not self._subscriber.subscribed.wait(0.1) and not self.stop.is_set():
                pass
            dropped = len(self._inbox.drain()) + len(self._unwritten)
            self._unwritten = []
            self._takeovers.clear()
            log.warning(
                "%s stalled %.1f s, past half the dedup window: dropped %d held messages, "
                "which live consumers took over",
                self.context,
                stalled_ms / 1000,
                dropped,
            )
        self._register(new_consumer_id(self.slot))
        self._fenced.clear()
        log.warning(
            "%s rejoined after a stall of %.1f s (was %s)", self.context, stalled_ms / 1000, old_id
        )
        held, self._unwritten = self._unwritten, []
        self._write(held)

    # -- heartbeat thread ---------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval_s = self.settings.heartbeat_interval_ms / 1000
        next_backlog_check = time.monotonic()
        self._backlog_warned = 0.0
        while not self.stop.wait(interval_s):
            if os.getppid() != self._parent_pid:
                log.error("%s supervisor is gone: stopping", self.context)
                self.stop.set()
                return
            try:
                self._beat()
                self._publish_gaps()
                if time.monotonic() >= next_backlog_check:
                    next_backlog_check = time.monotonic() + BACKLOG_CHECK_S
                    self._check_backlog()
            except CONNECTION_ERRORS as error:
                self._heartbeat_outage.failed(error)
                continue
            self._heartbeat_outage.recovered()

    def _beat(self) -> None:
        with self._membership_lock:
            self._beat_locked()

    def _beat_locked(self) -> None:
        view = self._membership.beat()
        me = self.consumer_id
        if not view.alive:
            if not self._fenced.is_set():
                log.warning("%s heartbeat had expired: the group declared us dead", self.context)
            self._fenced.set()
            return
        members = frozenset(view.members)
        if members != self._members:
            self._members = members
            taken = self._strategy.update(members, me)
            log.info("%s group changed: %d live consumers", self.context, len(members))
            if taken:
                self._takeovers.append(taken)
        self._take_over_gaps(me)

    def _take_over_gaps(self, me: str) -> None:
        reply: Any = self._heartbeat_client.xread({self.keys.gaps: self._gaps_seen}, count=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._gaps_seen = entry_id.decode()
                member = fields[b"consumer_id"].decode()
                if member == me or member not in self._members:
                    continue
                taken = self._strategy.gap_reported(member)
                if taken:
                    log.info(
                        "%s %s reported a subscription gap: trying %d of its buffered messages",
                        self.context,
                        member,
                        len(taken),
                    )
                    self._takeovers.append(taken)

    def _publish_gaps(self) -> None:
        while self._own_gaps:
            gap = self._own_gaps[0]
            self._heartbeat_client.xadd(
                self.keys.gaps,
                {"consumer_id": self.consumer_id, "start_ms": gap.start_ms, "end_ms": gap.end_ms},
                maxlen=GAPS_MAXLEN,
                approximate=True,
            )
            self._own_gaps.popleft()

    def _check_backlog(self) -> None:
        """Warns well before Redis cuts us off for reading slowly (client-output-buffer-limit)."""
        client_id = self._subscriber.client_id
        if client_id is None:
            return
        info = self._heartbeat_client.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "LIST", "ID", client_id
        )
        fields = (
            dict(item.split("=", 1) for item in info.decode().split() if "=" in item)
            if isinstance(info, bytes)
            else {}
        )
        omem = int(fields.get("omem", 0))
        if omem >= self.settings.backlog_warn_bytes:
            now = time.monotonic()
            if now - self._backlog_warned >= BACKLOG_WARN_REPEAT_S:
                self._backlog_warned = now
                log.warning(
                    "%s falling behind: Redis holds %.1f MiB unread for our subscription "
                    "(cut off at the pubsub client-output-buffer-limit, 32 MiB by default)",
                    self.context,
                    omem / 2**20,
                )


def run_consumer(settings: Settings, slot: int, stats: ConsumerStats | None) -> None:
    Consumer(settings, slot, stats).run()
