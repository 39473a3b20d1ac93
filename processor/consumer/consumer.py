"""One consumer: read → own? → batch → process → write atomically → account.

Four threads, each with one job: the subscriber drains the socket (so Redis never sees a slow
subscriber), the heartbeat keeps us in the group and follows it, the write thread keeps one
script call in flight, and this loop validates, runs the handler and cuts batches. Reading never
waits for handlers or writes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TypeVar

from processor.config import Settings
from processor.consumer.dedup import SeenCheck, Window
from processor.consumer.heartbeat import Heartbeat
from processor.consumer.inbox import Inbox
from processor.consumer.membership import Membership, new_consumer_id, now_ms
from processor.consumer.messages import (
    DEAD,
    Entry,
    Message,
    handler_failed,
    output_entry,
    parse,
    reason_kind,
)
from processor.consumer.ownership import make_strategy
from processor.consumer.stats import ADDED, BusyMeter, ConsumerStats, ConsumerTotals, RateMeter
from processor.consumer.subscriber import Gap
from processor.consumer.subscribers import Subscribers
from processor.consumer.write_thread import Batch, WriteThread
from processor.consumer.writer import Writer, WriteResult
from processor.errors import ConsumerFailed, RetryStopped
from processor.handlers import Failure, FailureLog, Runner, load_handler, make_runner
from processor.observe.counters import record_unwritten
from processor.observe.logs import Tagged
from processor.observe.metrics import ConsumerMetrics
from processor.store.connection import CONNECTION_ERRORS, command_client
from processor.store.keys import Keys
from processor.store.outage import Backoff, Outage, Retrier

log = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_WAIT_S = 0.1
DEFAULT_HANDLER = "processor.handlers:add_random_score"


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
        self._takeovers: deque[list[bytes]] = deque()
        self._inbox = Inbox()
        # The group declared us dead: told by the heartbeat (an empty list) and by the write
        # thread (the batch the fence refused); the loop alone takes them into its own state.
        self._fence_reports: queue.SimpleQueue[list[Entry]] = queue.SimpleQueue()
        self._fenced = False
        self._unwritten: list[Entry] = []
        # Messages in the batch the handler is running on (set by this loop only).
        self._in_hand = 0
        self._flushed = threading.Event()
        self._failure: str | None = None
        self._failure_lock = threading.Lock()
        self._rate = RateMeter()
        self._log = Tagged(log, self._tag)
        self._busy = BusyMeter()
        self._totals = ConsumerTotals()
        # The slot's sums before us (see stats.ADDED): ours are added to them.
        self._stats_base = {name: stats.get(name) for name in ADDED} if stats else {}
        self._reported_id = ""

    @property
    def _batch_size(self) -> int:
        """Messages per batch: PROCESSING_BATCH_SIZE per partition, since a batch is written
        with one script call per partition (measured: a 3-partition cluster spends 1.47x one
        Redis's CPU per message with 100 per batch, 1.23x with 300)."""
        return self.settings.processing_batch_size * len(self.keys.partitions)

    def _batches(self, items: list[T]) -> Iterator[list[T]]:
        size = self._batch_size
        for start in range(0, len(items), size):
            yield items[start : start + size]

    def _tag(self) -> str:
        """Who we are in the log, as of now: our id changes as we rejoin."""
        return f"[{self._membership.consumer_id or 'joining'} pid={os.getpid()}]"

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> None:
        """Blocks until stopped; raises ConsumerFailed if one of its threads died."""
        self._set_up()
        try:
            self._join()
            while not self.stop.is_set():
                self._step()
            if self._failure is None:
                self._flush()
        except Exception as error:
            self._thread_failed("consumer", error)
        finally:
            self._tear_down()
        if self._failure is not None:
            raise ConsumerFailed(self._failure)

    def _thread_failed(self, thread: str, error: BaseException) -> None:
        """Any thread's unexpected death: stop now and leave, rather than linger half-dead."""
        with self._failure_lock:
            first = self._failure is None
            if first:
                self._failure = f"{thread} thread failed: {type(error).__name__}: {error}"
        if first:
            self._log.error(
                "%s thread died: leaving the group so the others take over its share",
                thread,
                exc_info=error,
            )
        else:
            self._log.debug("%s thread also stopped: %r", thread, error)
        self.stop.set()

    def _set_up(self) -> None:
        settings = self.settings
        self._metrics = ConsumerMetrics(enabled=settings.metrics_port > 0)
        on_recovered = self._metrics.reconnected if self._metrics.enabled else None
        handler = load_handler(settings.handler)
        # The built-in handler cannot hang: skip the two timer syscalls per message.
        timeout_s = 0.0 if settings.handler == DEFAULT_HANDLER else settings.handler_timeout_s
        self._runner: Runner = make_runner(handler, timeout_s, settings.handler_concurrency)
        self._failures = FailureLog(settings.monitor_interval_s, self._log)
        self._client = command_client(settings, name="processor-consumer")
        self._seen = SeenCheck(self._client, self.keys, Window.for_ttl(settings.dedup_window_ms))
        heartbeat_client = command_client(settings, name="processor-heartbeat")
        # On a cluster the heartbeat thread also talks to every partition's primary (fences,
        # backlog checks): with a quarter of the TTL at most, so one node failing over cannot
        # stall the beats past the TTL.
        side_client = heartbeat_client
        if self.keys.cluster:
            side_timeout_s = settings.heartbeat_ttl_ms / 4000
            side_client = command_client(
                settings, name="processor-heartbeat-side", timeout_s=side_timeout_s, retries=0
            )
        self._membership = Membership(
            heartbeat_client,
            self.keys,
            settings.heartbeat_ttl_ms,
            fence_ttl_ms=settings.takeover_buffer_ms,
            fence_client=side_client,
        )
        self._strategy = make_strategy(
            settings.strategy,
            settings.takeover_buffer_ms / 1000,
            settings.takeover_buffer_max,
            # Half the dedup window, as for a rejoin after a stall: a takeover of what is older
            # could write again what its owner wrote before the window forgot it.
            settings.dedup_window_ms / 2000,
        )
        gaps: queue.SimpleQueue[Gap] = queue.SimpleQueue()  # read by the heartbeat only
        self._subscriber = Subscribers(
            settings,
            self.keys,
            deliver=self._route,
            on_gap=gaps.put,
            tagged=self._log,
            backoff_max_s=settings.reconnect_backoff_max_s,
            on_failure=self._thread_failed,
            on_recovered=on_recovered,
        )
        self._heartbeat = Heartbeat(
            heartbeat_client,
            self.keys,
            self._membership,
            self._strategy,
            interval_s=settings.heartbeat_interval_ms / 1000,
            backlog_warn_bytes=settings.backlog_warn_bytes,
            stop=self.stop,
            done=self._flushed,
            tagged=self._log,
            subscriptions=self._subscriber.connections,
            on_takeover=self._takeovers.append,
            on_fenced=partial(self._fence_reports.put, []),
            on_failure=self._thread_failed,
            status=self._on_beat,
            report=self._report_stats,
            gaps=gaps,
            probe_client=side_client,
            on_recovered=on_recovered,
        )
        writer = Writer(
            self._client,
            self.keys,
            settings.dedup_window_ms,
            settings.reconnect_backoff_max_s,
            self._log,
            stop=self.stop,
            grace_s=settings.shutdown_grace_s * 0.5,
            maxlen=settings.output_maxlen,
            wait_replicas=settings.wait_replicas,
            holding=self._held,
            strict_wait=settings.wait_replicas_mode == "strict",
            on_recovered=on_recovered,
        )
        self._writes = WriteThread(
            writer,
            identity=lambda: (self._membership.consumer_id, self._membership.token),
            on_done=self._written,
            on_failure=self._thread_failed,
        )
        self._registration = Retrier(
            Outage("Redis (registration)", self._log, on_recovered=on_recovered),
            Backoff(0.1, settings.reconnect_backoff_max_s),
            self.stop,
        )

    def _join(self) -> None:
        """Subscribes first, then registers: a listed consumer is always a subscribed one."""
        self._subscriber.start()
        self._writes.start()
        while not self._subscriber.wait_subscribed(0.1):
            if self.stop.is_set():
                return
        self._register(new_consumer_id(self.slot))
        self._heartbeat.start()
        self._log.info(
            "consumer ready: channels=%s strategy=%s batch=%d window=%dms concurrency=%d",
            ",".join(partition.channel for partition in self.keys.partitions),
            self._strategy.name,
            self._batch_size,
            self.settings.batch_window_ms,
            self.settings.handler_concurrency,
        )

    def _register(self, consumer_id: str) -> None:
        if self.stop.is_set():
            return
        try:
            self._registration.call(partial(self._register_once, consumer_id))
        except RetryStopped:
            return

    def _register_once(self, consumer_id: str) -> None:
        with self._heartbeat.lock:
            self._membership.register(consumer_id)
            self._heartbeat.beat()

    def _step(self) -> None:
        if self._take_fence_reports():
            self._fenced = True
        if self._fenced:
            self._rejoin()
        while self._takeovers:
            self._take_over(self._takeovers.popleft())
        payloads = self._inbox.take(
            self._batch_size, self.settings.batch_window_ms / 1000, IDLE_WAIT_S
        )
        if payloads:
            self._in_hand = len(payloads)  # out of the inbox, not submitted yet
            self._handle(payloads, received_at=self._inbox.oldest_taken)
        self._failures.report()

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
        for batch in self._batches(self._inbox.drain()):
            self._handle(batch)
        self._writes.wait_idle()
        self._failures.report(final=True)

    def _tear_down(self) -> None:
        self.stop.set()
        self._subscriber.stop()
        if self._failure is not None:
            # Leave first: whatever we still hold may never be written by us.
            self._flushed.set()
            self._leave(self._failure)
        if self._writes.is_alive():
            self._writes.close()
        self._flushed.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=2)
        if self._failure is None:
            self._leave("stopped")
        self._runner.close()
        self._count_unwritten()
        totals = self._totals.snapshot()
        self._log.info(
            "consumer stopped: written=%d dead=%d skipped=%d taken_over=%d lost=%d "
            "left_to_takeover=%d gaps=%d unconfirmed=%d",
            totals.written,
            totals.dead,
            totals.skipped,
            totals.taken_over,
            totals.lost,
            totals.left_to_takeover,
            self._subscriber.gaps,
            totals.unconfirmed,
        )

    def _held(self) -> int:
        """Messages received and not written yet, that we owned or had started to take over:
        waiting for the handler or the write (the fenced ones are counted apart).

        Not the takeovers still queued: copies of others' messages, which their owner wrote
        (a departure announced as it stopped) or the other consumers' buffers also hold."""
        return len(self._inbox) + self._in_hand + self._writes.holding()

    def _count_unwritten(self) -> None:
        """What we still hold once every thread has stopped, counted where operators read it.

        After a failure we left the group before writing it, and writes refused by the fence
        were made after the group declared us dead: either way the live consumers' takeover
        buffers hold a copy of everything published while they were subscribed, and they try
        it. Otherwise (no one else live, or a stop that could not write it) it is lost.
        """
        self._take_fence_reports()  # the batches the fence refused, once the writer has stopped
        untried = sum(len(chunk) for chunk in self._takeovers)
        if untried:
            self._log.info(
                "%d messages routed to consumers that left were not tried as we stopped: "
                "their owners wrote them, or the live consumers' buffers hold them",
                untried,
            )
        fenced = len(self._unwritten)
        unwritten = self._held() + fenced
        if not unwritten:
            self._report_unwritten()
            return
        others = self._heartbeat.members - {self._membership.consumer_id}
        if (self._failure is not None or fenced) and others:
            self._totals.loop.left_to_takeover += unwritten
            self._log.error(
                "left the group holding %d unwritten messages: the %d live consumers try "
                "them from their takeover buffers",
                unwritten,
                len(others),
            )
        else:
            self._totals.loop.lost += unwritten
            self._log.error(
                "stopped holding %d unwritten messages, with no live consumer to take them "
                "over: lost",
                unwritten,
            )
        self._report_unwritten()

    def _report_unwritten(self) -> None:
        """Adds our lost and left counts to /metrics and to the group's counters in Redis
        (``processor status``); a Redis that is away loses only this report."""
        totals = self._totals.snapshot()
        lost, left = totals.lost, totals.left_to_takeover
        self._metrics.unwritten(lost, left)
        if not lost and not left:
            return
        try:
            record_unwritten(self._client, self.keys, lost=lost, left_to_takeover=left)
        except CONNECTION_ERRORS as error:
            self._log.warning(
                "lost=%d left_to_takeover=%d not added to the group's counters: %s",
                lost,
                left,
                error,
            )

    def _leave(self, reason: str) -> None:
        try:
            with self._heartbeat.lock:
                self._membership.leave(reason)
        except CONNECTION_ERRORS as error:
            self._log.warning(
                "could not leave the group (%s): its heartbeat will expire",
                error,
            )

    # -- the hot path -------------------------------------------------------------------------

    def _route(self, chunk: list[bytes]) -> None:
        """Called by the subscriber thread for every socket read."""
        owned = self._strategy.split(chunk, time.monotonic())
        if owned:
            self._inbox.put(owned)

    def _handle(
        self,
        payloads: Sequence[bytes],
        skip_written: bool = False,
        received_at: float | None = None,
    ) -> None:
        """Validates, processes and submits one batch for writing, in the order received."""
        started = time.monotonic()
        self._in_hand = len(payloads)
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
                    self._failures.failed(message.message_id, result.reason, result.error)
                    continue
                entry = output_entry(message, result, max_bytes)
                if entry.kind == DEAD:
                    self._failures.failed(message.message_id, entry.reason)
                entries[position] = entry
        batch = [entry for entry in entries if entry is not None]
        # Busy until the batch is ready: a wait for the write queue (Redis is the bottleneck)
        # is not work more consumers would share.
        self._busy.add(time.monotonic() - started)
        if batch:
            self._writes.submit(batch, received_at)
        self._in_hand = 0

    def _written(self, batch: Batch, result: WriteResult | None, started: float) -> None:
        """Called by the write thread after each batch."""
        entries = batch.entries
        if result is None:
            self._totals.writes.lost += len(entries)
            self._log.error(
                "Redis still unreachable at shutdown: %d received messages not written",
                len(entries),
            )
            return
        if result.fenced:
            # We were declared dead while stalled; _rejoin decides what happens to these.
            self._fence_reports.put(entries)
            return
        replied = time.monotonic()
        self._metrics.batch(len(entries), replied - started, batch.received_at, replied)
        dead_entries = (entry for entry in entries if entry.kind == DEAD)
        reasons = [
            reason_kind(entry.reason)
            for entry, flag in zip(dead_entries, result.dead_flags, strict=False)
            if flag == "1"
        ]
        self._metrics.written(result.written, result.skipped, reasons)
        self._metrics.unconfirmed(result.unconfirmed)
        counts = self._totals.writes
        counts.unconfirmed += result.unconfirmed
        counts.written += result.written
        counts.dead += result.dead
        counts.skipped += result.skipped

    def _on_beat(self) -> dict[str, str | int | float]:
        """Called by the heartbeat thread before each beat: the metrics that are not recorded
        per batch are synced at its cadence, and our status goes out with the beat."""
        status = self._status()
        self._sync_metrics(int(status["held"]))
        return status

    def _status(self) -> dict[str, str | int | float]:
        """What ``processor status`` shows of us; written to Redis with every heartbeat."""
        totals = self._totals.snapshot()
        return {
            "host": self.settings.host,
            "pid": os.getpid(),
            "slot": self.slot,
            "strategy": self._strategy.name,
            "received": self._subscriber.received,
            "written": totals.written,
            "dead": totals.dead,
            "skipped": totals.skipped,
            "taken_over": totals.taken_over,
            "buffered": self._strategy.buffered,
            "held": self._held(),
            "gaps": self._subscriber.gaps,
            "rate": round(self._rate.rate(totals.written), 1),
            "subscribed": int(self._subscriber.is_subscribed()),
            "backlog_bytes": self._heartbeat.backlog_bytes,
            "inbox": len(self._inbox),
            "busy": round(self._busy.share(), 3),
        }

    def _sync_metrics(self, held: int) -> None:
        subscriber = self._subscriber
        totals = {
            "received": subscriber.received,
            "taken_over": self._totals.loop.taken_over,
            "gaps": subscriber.gaps,
            "gap_seconds": subscriber.gap_seconds,
        }
        self._metrics.sync(totals, self._strategy.buffered, held, self._heartbeat.backlog_bytes)

    def _report_stats(self) -> None:
        """Our id and counters for the supervisor, called by the heartbeat thread: the one
        writer of ``stats``, which goes on while this loop waits for a handler."""
        if self.stats is None:
            return
        consumer_id = self._membership.consumer_id
        if consumer_id and consumer_id != self._reported_id:
            self._reported_id = self.stats.consumer_id = consumer_id
        ready = self._subscriber.is_subscribed() and not self._fenced and not self.stop.is_set()
        totals = self._totals.snapshot()
        base = self._stats_base
        self.stats.set(
            received=self._subscriber.received,
            gaps=self._subscriber.gaps,
            buffered=self._strategy.buffered,
            held=self._held(),
            ready=int(ready),
            **{name: base[name] + getattr(totals, name) for name in ADDED},
        )

    def _take_fence_reports(self) -> bool:
        """Takes what the heartbeat and the write thread reported of a fence; True if any."""
        reported = False
        while True:
            try:
                refused = self._fence_reports.get_nowait()
            except queue.Empty:
                return reported
            self._unwritten.extend(refused)
            reported = True

    # -- takeover and rejoin ------------------------------------------------------------------

    def _take_over(self, payloads: list[bytes]) -> None:
        """Tries messages another consumer may have missed; the write skips any it wrote."""
        self._totals.loop.taken_over += len(payloads)
        for batch in self._batches(payloads):
            self._handle(batch, skip_written=True)

    def _without_written(
        self, entries: list[Entry | None], messages: list[tuple[int, Message]]
    ) -> tuple[list[Entry | None], list[tuple[int, Message]]]:
        """Drops what is already written, so a takeover runs the handler only where needed."""
        by_position = dict(messages)
        dedup_ids = [
            by_position[position].message_id if entry is None else entry.dedup_id
            for position, entry in enumerate(entries)
        ]
        try:
            written = self._seen.seen(dedup_ids)
        except CONNECTION_ERRORS:
            return entries, messages  # the write will retry, and its check still decides
        kept_entries: list[Entry | None] = []
        kept_messages: list[tuple[int, Message]] = []
        for position, (entry, done) in enumerate(zip(entries, written, strict=True)):
            if done:
                continue
            if entry is None:
                kept_messages.append((len(kept_entries), by_position[position]))
            kept_entries.append(entry)
        return kept_entries, kept_messages

    def _rejoin(self) -> None:
        """We were declared dead (stalled past the heartbeat TTL): rejoin under a new id.

        What we hold was received before or during the stall. If another consumer has been live
        since before the stall, it took over our share; and if the stall was long enough for
        ids to be forgotten (half the dedup window), writing what we hold could duplicate it, so
        we drop it along with the socket's unread backlog. Otherwise we write it: the write skips
        whatever someone else wrote.
        """
        self._writes.wait_idle()
        self._take_fence_reports()  # what the fence refused meanwhile
        old_id = self._membership.consumer_id
        last_beat_ms = self._membership.last_beat_ms
        stalled_ms = now_ms() - last_beat_ms
        try:
            members = self._membership.read().members
        except CONNECTION_ERRORS:
            return  # Redis is away; the heartbeat stays fenced and we try again next step
        covered = any(
            registered < last_beat_ms for member, registered in members.items() if member != old_id
        )
        if covered and stalled_ms * 2 >= self.settings.dedup_window_ms:
            self._subscriber.reset()
            while not self._subscriber.wait_subscribed(0.1) and not self.stop.is_set():
                pass
            # The takeover buffer too: what it holds was received late, after the stall, so
            # its age no longer bounds how old it is, and a later takeover (or the shutdown
            # sweep) would retry it after its id was forgotten.
            dropped = len(self._inbox.drain()) + len(self._unwritten) + self._strategy.discard()
            self._unwritten = []
            self._takeovers.clear()
            self._log.warning(
                "stalled %.1f s, past half the dedup window: dropped %d held messages, "
                "which live consumers took over",
                stalled_ms / 1000,
                dropped,
            )
        self._register(new_consumer_id(self.slot))
        # Reports of the old id made before the new one beat: the rejoin answers them.
        self._take_fence_reports()
        self._fenced = False
        self._log.warning(
            "rejoined after a stall of %.1f s (was %s)",
            stalled_ms / 1000,
            old_id,
        )
        held, self._unwritten = self._unwritten, []
        # Batch by batch, as received: a batch is one script call on a single Redis, written
        # whole or refused whole by a fence, so a refusal never strands a written part here.
        for batch in self._batches(held):
            self._writes.submit(batch)
