"""Prometheus metrics, in prometheus-client's multiprocess mode, and the counters behind them.

Off unless ``METRICS_PORT`` is set. Then the supervisor creates a directory for the metric files
and exports it in ``PROMETHEUS_MULTIPROC_DIR`` before any process imports prometheus-client
(which reads it at import) and before it spawns a consumer (which inherits it); each consumer
records into its own files and the supervisor's endpoint (``processor.observe.health``) sums them,
so one scrape shows the whole local group, dead consumers' counts included. Nothing here runs per
message: the write thread records per batch, the heartbeat thread syncs the rest per beat.

Labelled counters are created at 0 for every label value they can take (each dead-letter
reason, each connection), so ``rate()`` and ``absent()`` work before the first event.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

from processor.consumer.messages import REASON_CODES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The consumer's Outage names (writer, heartbeat, subscriber, registration), which label its
# reconnects: a connection missing here still counts, from its first reconnect on.
CONNECTIONS = (
    "Redis (writes)",
    "Redis (heartbeat)",
    "Redis (group events)",
    "Redis (registration)",
    "Pub/Sub subscription",
)

BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
SCRIPT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HANDLER_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)


def prepare_multiprocess_dir() -> str:
    """Called by the supervisor before anything imports prometheus-client; returns the dir."""
    directory = tempfile.mkdtemp(prefix="processor-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    return directory


def remove_multiprocess_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class ConsumerMetrics:
    """What one consumer records; a no-op unless built with ``enabled=True``."""

    def __init__(self, enabled: bool, role: str = "reader") -> None:
        self.enabled = enabled
        self._role = role
        self._synced: dict[str, float] = {}
        if not enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram

        # Per process: a reader reads every message of the channel (ownership is decided after
        # the read), a fed consumer gets its share from a reader.
        self._received = Counter(
            "processor_messages_received",
            "Messages a consumer received: role reader, every message of the channel read from "
            "its subscription (R readers count R per message published); role fed, its share, "
            "handed on by a reader",
            ["role"],
        ).labels(role=role)
        self._written = Counter(
            "processor_messages_written", "Messages appended to the output stream"
        )
        self._skipped = Counter(
            "processor_messages_skipped",
            "Messages not appended because another consumer (or an earlier try) had written them",
        )
        self._unconfirmed = Counter(
            "processor_messages_unconfirmed",
            "Messages written (output and dead letters) that fewer than WAIT_REPLICAS replicas "
            "had confirmed when the write was accepted",
        )
        self._dead = Counter(
            "processor_messages_dead_lettered",
            "Entries appended to the dead-letter stream, by reason",
            ["reason"],
        )
        for reason in REASON_CODES:
            self._dead.labels(reason)
        self._taken_over = Counter(
            "processor_messages_taken_over",
            "Buffered messages tried for a consumer that left, died or reported a gap",
        )
        self._lost = Counter(
            "processor_messages_lost",
            "Messages a consumer held unwritten when it exited, with no live consumer to take "
            "them over (or a stop that could not write them)",
        )
        self._left = Counter(
            "processor_messages_left_to_takeover",
            "Messages a consumer held unwritten when it left the group after a failure; the live "
            "consumers try them from their takeover buffers",
        )
        self._gaps = Counter(
            "processor_subscription_gaps", "Times a consumer's subscription was lost and restored"
        )
        self._gap_seconds = Counter(
            "processor_subscription_gap_seconds", "Total length of the subscription gaps"
        )
        self._reconnects = Counter(
            "processor_redis_reconnects",
            "Redis outages recovered from, by connection",
            ["connection"],
        )
        for connection in CONNECTIONS:
            self._reconnects.labels(connection)
        self._batch = Histogram(
            "processor_batch_size_messages", "Entries per script call", buckets=BATCH_BUCKETS
        )
        self._script = Histogram(
            "processor_script_call_seconds",
            "Latency of one deduplicate-and-append script call",
            buckets=SCRIPT_BUCKETS,
        )
        self._latency = Histogram(
            "processor_publish_to_stream_seconds",
            "From the receipt of a batch's oldest message to the script's reply",
            buckets=LATENCY_BUCKETS,
        )
        self._handler = Histogram(
            "processor_handler_batch_seconds",
            "Time the handler took over one batch's valid messages (HANDLER_CONCURRENCY at once)",
            buckets=HANDLER_BUCKETS,
        )
        self._buffered = Gauge(
            "processor_takeover_buffer_messages",
            "Messages a consumer keeps for takeovers",
            multiprocess_mode="liveall",
        )
        self._held = Gauge(
            "processor_messages_held",
            "Messages a consumer received and has not written yet (waiting for the handler or "
            "for Redis to take the write)",
            multiprocess_mode="liveall",
        )
        self._backlog = Gauge(
            "processor_subscriber_output_buffer_bytes",
            "What Redis holds unsent for a consumer's subscription (CLIENT LIST omem)",
            multiprocess_mode="liveall",
        )
        self._feeds = Gauge(
            "processor_reader_feeds",
            "Consumers a reader feeds now (0 for fed consumers)",
            multiprocess_mode="liveall",
        )
        self._spreading = Gauge(
            "processor_reader_spreading",
            "1 while a reader sends the consumers it feeds their messages, 0 while it handles "
            "them itself (SPREAD=auto, a cheap handler: they stand by) or feeds none",
            multiprocess_mode="liveall",
        )

    def batch(
        self, size: int, script_s: float, oldest_received: float | None, replied: float
    ) -> None:
        if not self.enabled:
            return
        self._batch.observe(size)
        self._script.observe(script_s)
        if oldest_received is not None:
            self._latency.observe(max(0.0, replied - oldest_received))

    def handled(self, seconds: float) -> None:
        if self.enabled:
            self._handler.observe(seconds)

    def written(self, written: int, skipped: int, dead_reasons: Iterable[str]) -> None:
        if not self.enabled:
            return
        if written:
            self._written.inc(written)
        if skipped:
            self._skipped.inc(skipped)
        for reason in dead_reasons:
            self._dead.labels(reason).inc()

    def unconfirmed(self, messages: int) -> None:
        if self.enabled and messages:
            self._unconfirmed.inc(messages)

    def reconnected(self, connection: str) -> None:
        if self.enabled:
            self._reconnects.labels(connection).inc()

    def unwritten(self, lost: int, left_to_takeover: int) -> None:
        """Once, as the consumer exits: what it held unwritten."""
        if not self.enabled:
            return
        if lost:
            self._lost.inc(lost)
        if left_to_takeover:
            self._left.inc(left_to_takeover)

    def feeds(self, feeds: int, spreading: bool) -> None:
        """Per heartbeat: how many consumers a reader feeds, and whether it sends them their
        messages. Whether we receive is exported by the supervisor
        (``processor.observe.receiving``), which sees when we stop reporting."""
        if self.enabled:
            self._feeds.set(feeds)
            self._spreading.set(int(spreading))

    def sync(self, totals: dict[str, float], buffered: int, held: int, backlog_bytes: int) -> None:
        """Per heartbeat: counters that grow elsewhere, as deltas since the last sync."""
        if not self.enabled:
            return
        counters: dict[str, Any] = {
            "received": self._received,
            "taken_over": self._taken_over,
            "gaps": self._gaps,
            "gap_seconds": self._gap_seconds,
        }
        for name, counter in counters.items():
            delta = totals[name] - self._synced.get(name, 0)
            if delta > 0:
                counter.inc(delta)
                self._synced[name] = totals[name]
        self._buffered.set(buffered)
        self._held.set(held)
        self._backlog.set(backlog_bytes)
