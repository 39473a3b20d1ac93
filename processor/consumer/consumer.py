"""One consumer: read → own? → batch → process → write atomically → account.

Four threads, each with one job: the subscriber drains the socket (so Redis never sees a slow
subscriber), the heartbeat keeps us in the group and follows it, the write thread keeps one
script call in flight, and this loop validates, runs the handler and cuts batches. Reading never
waits for handlers or writes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TypeVar

from processor.config import Settings
from processor.consumer.assembly import Hooks, assemble
from processor.consumer.feeds import FeedPlan
from processor.consumer.fence import Fence
from processor.consumer.inbox import Inbox
from processor.consumer.membership import new_consumer_id
from processor.consumer.messages import (
    DEAD,
    handler_failed,
    output_entry,
    parse_all,
)
from processor.consumer.reporting import Reporting
from processor.consumer.spread import HandlerLoad
from processor.consumer.stats import ADDED, BusyMeter, ConsumerStats, ConsumerTotals
from processor.consumer.takeover import without_written
from processor.consumer.write_thread import Batch
from processor.consumer.writer import WriteResult
from processor.errors import ConsumerFailed, RetryStopped
from processor.handlers import Failure, run_with_retries
from processor.observe.logs import Tagged
from processor.store.connection import CONNECTION_ERRORS
from processor.store.keys import Keys

log = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_WAIT_S = 0.1


class Consumer:
    """A member of the group. ``run()`` blocks until ``stop`` is set, then flushes and leaves."""

    def __init__(
        self,
        settings: Settings,
        slot: int = 0,
        stats: ConsumerStats | None = None,
        stop: threading.Event | None = None,
        plan: FeedPlan | None = None,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self._plan = plan
        self.stats = stats
        self.stop = stop or threading.Event()
        self.keys = Keys.from_settings(settings)
        self._takeovers: deque[list[bytes]] = deque()
        self._inbox = Inbox()
        # Messages in the batch the handler is running on (set by this loop only).
        self._in_hand = 0
        self._flushed = threading.Event()
        self._failure: str | None = None
        self._failure_lock = threading.Lock()
        self._log = Tagged(log, self._tag, self._log_fields)
        self._busy = BusyMeter()
        self._handler_load = HandlerLoad()
        self._totals = ConsumerTotals()
        # The slot's sums before us (see stats.ADDED): ours are added to them.
        self._stats_base = {name: stats.get(name) for name in ADDED} if stats else {}

    @property
    def _batch_size(self) -> int:
        """PROCESSING_BATCH_SIZE per partition: a batch is one script call per partition (a
        3-partition cluster spent 1.47x one Redis's CPU a message at 100 a batch, 1.23x at 300)."""
        return self.settings.processing_batch_size * len(self.keys.partitions)

    def _batches(self, items: list[T]) -> Iterator[list[T]]:
        for start in range(0, len(items), size := self._batch_size):
            yield items[start : start + size]

    def _tag(self) -> str:
        """Who we are in the log, as of now: our id changes as we rejoin."""
        return f"[{self._membership.consumer_id or 'joining'} pid={os.getpid()}]"

    def _log_fields(self) -> dict[str, object]:
        """Who we are in a JSON log line (the pid is on every line already)."""
        return {"consumer_id": self._membership.consumer_id or None, "slot": self.slot}

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Blocks until stopped; returns how many it counted lost; raises ConsumerFailed."""
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
        return self._totals.snapshot().lost

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
        # The fence and the reporting are built from the parts, which call them only once
        # started: hence the late look-ups.
        hooks = Hooks(
            route=self._route,
            failed=self._thread_failed,
            take_over=self._takeovers.append,
            fenced=lambda: self._fence.report([]),
            status=lambda: self._reporting.on_beat(),
            report=lambda: self._reporting.report_stats(),
            held=self._held,
            written=self._written,
            handler_load=lambda: self._handler_load.load(len(self._inbox)),
            keep=self._inbox.keep,
        )
        parts = assemble(
            self.settings,
            self.keys,
            self.stop,
            self._flushed,
            self._log,
            hooks,
            self.slot,
            self._plan,
        )
        self._parts = parts
        self._metrics = parts.metrics
        self._runner = parts.runner
        self._failures = parts.failures
        self._seen = parts.seen
        self._membership = parts.membership
        self._strategy = parts.strategy
        self._subscriber = parts.subscriber
        self._heartbeat = parts.heartbeat
        self._writes = parts.writes
        self._registration = parts.registration
        self._fence = Fence(
            parts,
            self._inbox,
            self._takeovers,
            self.stop,
            self.settings.dedup_window_ms,
            register=lambda: self._register(new_consumer_id(self.slot)),
            batches=self._batches,
            tagged=self._log,
        )
        self._reporting = Reporting(
            self.settings,
            self.slot,
            self.keys,
            self.stats,
            parts,
            self._totals,
            self._busy,
            self._inbox,
            self._stats_base,
            held=lambda: self._held() + self._fence.holding(),
            serving=lambda: not self._fence.fenced and not self.stop.is_set(),
            tagged=self._log,
        )

    def _join(self) -> None:
        """Subscribes (or is fed by a reader) first, then registers: a listed consumer is
        always one that receives its messages."""
        consumer_id = new_consumer_id(self.slot)
        self._subscriber.rename(consumer_id)
        self._parts.start_reading()
        self._writes.start()
        if self._receiving():
            self._register(consumer_id)
        self._heartbeat.start()
        self._log.info(
            "consumer ready: %s channels=%s strategy=%s batch=%d window=%dms concurrency=%d",
            self._parts.role,
            ",".join(partition.channel for partition in self.keys.partitions),
            self._strategy.name,
            self._batch_size,
            self.settings.batch_window_ms,
            self.settings.handler_concurrency,
        )

    def _register(self, consumer_id: str) -> bool:
        """True once registered; stopping, under an id never listed (to write what we hold)."""
        if self.stop.is_set():  # a rejoin in the flush, or stopped before we joined
            if self._fence.fenced:
                self._register_once(consumer_id, listed=False)  # raises while Redis is away
            return self._fence.fenced
        # A fed consumer's reader learns its new id first (after a rejoin).
        if self._subscriber.rename(consumer_id) and not self._receiving():
            return False
        try:
            self._registration.call(partial(self._register_once, consumer_id))
        except RetryStopped:
            return False
        return True

    def _receiving(self) -> bool:
        """Waits until subscribed (or fed by a reader); False when stopped first."""
        while not self._subscriber.wait_subscribed(0.1):
            if self.stop.is_set():
                return False
        return True

    def _register_once(self, consumer_id: str, listed: bool = True) -> None:
        with self._heartbeat.lock:
            self._membership.register(consumer_id, listed)
            self._heartbeat.beat()

    def _step(self) -> None:
        if self._fence.take_reports():
            self._fence.fenced = True
        if self._fence.fenced:
            self._fence.rejoin()
        while self._takeovers:
            self._take_over(self._takeovers.popleft())
        payloads = self._inbox.take(
            self._batch_size, self.settings.batch_window_ms / 1000, IDLE_WAIT_S
        )
        if payloads:
            self._in_hand = len(payloads)  # out of the inbox, not submitted yet
            self._handle(payloads, received_at=self._inbox.oldest_taken)
            self._inbox.oldest_taken = None  # submitted: no longer held here
        self._failures.report()

    def _flush(self) -> None:
        """After a stop request: stop reading, hand our share over, write what we hold, leave."""
        stopping_since = time.monotonic()
        self._parts.stop_reading()
        self._subscriber.join(timeout=5)
        if not self._fence.fenced:
            # Ours are theirs now, however long this takes: buffers keep TAKEOVER_BUFFER_MS.
            with self._heartbeat.lock:
                self._membership.step_down("stopping")
        margin_s = self.settings.heartbeat_ttl_ms / 1000
        leftovers = self._strategy.leaving(stopping_since - margin_s)
        if leftovers:
            self._takeovers.append(leftovers)
        # Ours first (nobody else holds them), batch by batch: what is left counts as held.
        while len(self._inbox):
            self._handle(self._inbox.take(self._batch_size, 0, 0))
        while self._takeovers:
            self._take_over(self._takeovers.popleft())
        self._fence.write_refused()
        self._failures.report(final=True)

    def _tear_down(self) -> None:
        self.stop.set()
        self._parts.stop_reading()
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
        self._reporting.stopped()

    def _held(self) -> int:
        """Messages received, ours or taken over, not written yet (the fenced counted apart); not
        the takeovers still queued: copies their owner wrote or the readers' buffers hold."""
        return len(self._inbox) + self._in_hand + self._writes.holding()

    def _count_unwritten(self) -> None:
        """What we still hold once every thread has stopped, counted where operators read it."""
        self._fence.take_reports()  # the batches the fence refused, once the writer has stopped
        untried = sum(len(chunk) for chunk in self._takeovers)
        failed = self._failure is not None
        self._reporting.unwritten(untried, len(self._fence.unwritten), self._held(), failed)

    def _leave(self, reason: str) -> None:
        try:
            with self._heartbeat.lock:
                self._membership.leave(reason)
        except CONNECTION_ERRORS as error:
            self._log.warning("could not leave the group (%s): its heartbeat will expire", error)

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
        entries, messages = parse_all(payloads, max_bytes)
        if skip_written:
            entries, messages = without_written(self._seen, entries, messages)
        if messages:
            handler_started = time.monotonic()
            chosen = [message for _, message in messages]
            results = run_with_retries(
                self._runner, chosen, self.settings.handler_retries, self.stop
            )
            handler_s = time.monotonic() - handler_started
            self._metrics.handled(handler_s)
            self._handler_load.add(handler_s, len(chosen))
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
                "Redis still unreachable or refusing at shutdown: %d received messages not written",
                len(entries),
            )
            return
        if result.fenced:
            # We were declared dead while stalled; the rejoin decides what happens to these.
            self._fence.report(entries)
            return
        replied = time.monotonic()
        self._metrics.batch(len(entries), replied - started, batch.received_at, replied)
        dead_entries = (entry for entry in entries if entry.kind == DEAD)
        reasons = [
            entry.code
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

    # -- takeover ----------------------------------------------------------------------------

    def _take_over(self, payloads: list[bytes]) -> None:
        """Tries messages another consumer may have missed; the write skips any it wrote."""
        self._totals.loop.taken_over += len(payloads)
        for batch in self._batches(payloads):
            self._handle(batch, skip_written=True)
