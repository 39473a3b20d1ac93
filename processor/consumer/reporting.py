"""What a consumer tells others of itself: its status with each heartbeat, the metrics synced at
that cadence, its slot's stats for the supervisor, and at exit what it still held."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from processor.config import Settings
from processor.consumer.assembly import Parts
from processor.consumer.inbox import Inbox
from processor.consumer.ownership import PartitionedStrategy
from processor.consumer.stats import ADDED, BusyMeter, ConsumerStats, ConsumerTotals, RateMeter
from processor.observe.counters import record_unwritten
from processor.observe.logs import Tagged
from processor.observe.titles import retitle_consumer
from processor.store.connection import CONNECTION_ERRORS
from processor.store.keys import Keys


class Reporting:
    """Reads the consumer's counters and parts; writes its status, metrics and slot stats.

    Logs through the consumer's own logger (``tagged``): these lines were always the consumer's.
    """

    def __init__(
        self,
        settings: Settings,
        slot: int,
        keys: Keys,
        stats: ConsumerStats | None,
        parts: Parts,
        totals: ConsumerTotals,
        busy: BusyMeter,
        inbox: Inbox,
        stats_base: dict[str, int],
        held: Callable[[], int],
        serving: Callable[[], bool],
        tagged: Tagged,
    ) -> None:
        self._settings = settings
        self._slot = slot
        self._keys = keys
        self._stats = stats
        self._parts = parts
        self._totals = totals
        self._busy = busy
        self._inbox = inbox
        self._held = held
        # False once fenced or stopping: not ready, subscribed and registered or not.
        self._serving = serving
        self._log = tagged
        self._rate = RateMeter()
        # The slot's sums before us (see stats.ADDED): ours are added to them.
        self.stats_base = stats_base
        self._reported_id = ""

    def on_beat(self) -> dict[str, str | int | float]:
        """Called by the heartbeat thread before each beat: the metrics that are not recorded
        per batch are synced at its cadence, and our status goes out with the beat."""
        status = self.status()
        self._sync_metrics(int(status["held"]))
        return status

    def status(self) -> dict[str, str | int | float]:
        """What ``processor status`` shows of us; written to Redis with every heartbeat."""
        totals = self._totals.snapshot()
        parts = self._parts
        return {
            "host": self._settings.host,
            "pid": os.getpid(),
            "slot": self._slot,
            "strategy": parts.strategy.name,
            "role": parts.role,
            "feeds": self._feeds(),
            "received": parts.subscriber.received,
            "written": totals.written,
            "dead": totals.dead,
            "skipped": totals.skipped,
            "taken_over": totals.taken_over,
            "buffered": parts.strategy.buffered,
            "held": self._held(),
            "gaps": parts.subscriber.gaps,
            "rate": round(self._rate.rate(totals.written), 1),
            "subscribed": int(parts.subscriber.is_subscribed()),
            "standby": int(parts.subscriber.standing_by),
            "backlog_bytes": parts.heartbeat.backlog_bytes,
            "inbox": len(self._inbox),
            # How long we have held our oldest message unwritten: the readers keep their copies
            # at least that long (heartbeat.py).
            "held_for_ms": self._held_for_ms(),
            "busy": round(self._busy.share(), 3),
        }

    def _feeds(self) -> int:
        forwarder = self._parts.forwarder
        return 0 if forwarder is None else forwarder.fed

    def _held_for_ms(self) -> int:
        since = self._inbox.held_since()
        return 0 if since is None else int((time.monotonic() - since) * 1000)

    def _spreading(self) -> bool:
        strategy = self._parts.strategy
        return isinstance(strategy, PartitionedStrategy) and strategy.spreading

    def _sync_metrics(self, held: int) -> None:
        parts = self._parts
        subscriber = parts.subscriber
        totals = {
            "received": subscriber.received,
            "taken_over": self._totals.loop.taken_over,
            "gaps": subscriber.gaps,
            "gap_seconds": subscriber.gap_seconds,
        }
        parts.metrics.sync(totals, parts.strategy.buffered, held, parts.heartbeat.backlog_bytes)
        feeds = self._feeds()
        parts.metrics.feeds(feeds, spreading=feeds > 0 and self._spreading())

    def report_stats(self) -> None:
        """Our id and counters for the supervisor, called by the heartbeat thread: the one
        writer of ``stats``, which goes on while the loop waits for a handler, and while Redis
        is away (no Redis call here). The supervisor believes a report only while recent."""
        if self._stats is None:
            return
        parts = self._parts
        consumer_id = parts.membership.consumer_id
        if consumer_id and consumer_id != self._reported_id:
            self._reported_id = self._stats.consumer_id = consumer_id
            retitle_consumer(self._slot, consumer_id)
        receiving = parts.subscriber.is_subscribed()
        # Registered: our last beat found us listed, less than the TTL ago (after that the group
        # may have declared us dead, or a restarted Redis lost us, before our next beat says so).
        ready = receiving and parts.membership.registered() and self._serving()
        totals = self._totals.snapshot()
        base = self.stats_base
        self._stats.set(
            received=parts.subscriber.received,
            gaps=parts.subscriber.gaps,
            buffered=parts.strategy.buffered,
            held=self._held(),
            ready=int(ready),
            receiving=int(receiving),
            reader=int(parts.role == "reader"),
            feeds=self._feeds(),
            **{name: base[name] + getattr(totals, name) for name in ADDED},
        )
        self._stats.reported()

    def unwritten(self, untried: int, fenced: int, held: int, failed: bool) -> None:
        """Counts what we still hold once every thread has stopped, where operators read it.

        After a failure we left the group before writing it, and writes refused by the fence
        were made after the group declared us dead: either way the live consumers' takeover
        buffers hold a copy of everything published while they were subscribed, and they try
        it. Otherwise (no one else live, or a stop that could not write it) it is lost.
        ``untried`` are the queued takeovers, copies of others' messages: only logged.
        """
        if untried:
            self._log.info(
                "%d messages routed to consumers that left were not tried as we stopped: "
                "their owners wrote them, or the live consumers' buffers hold them",
                untried,
            )
        unwritten = held + fenced
        if not unwritten:
            self._report_unwritten()
            return
        others = self._parts.heartbeat.members - {self._parts.membership.consumer_id}
        if (failed or fenced) and others:
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
        self._parts.metrics.unwritten(lost, left)
        if not lost and not left:
            return
        try:
            record_unwritten(self._parts.client, self._keys, lost=lost, left_to_takeover=left)
        except CONNECTION_ERRORS as error:
            self._log.warning(
                "lost=%d left_to_takeover=%d not added to the group's counters: %s",
                lost,
                left,
                error,
            )

    def stopped(self) -> None:
        """The consumer's last line: its totals."""
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
            self._parts.subscriber.gaps,
            totals.unconfirmed,
        )
