"""The publisher: bursts of JSON messages for a set time, and an honest count of what arrived.

``PUBLISH`` replies with the number of subscribers that received the message; a message that
reached none is lost to Pub/Sub. We count those, and with ``retry_unreceived`` publish them
again: safe, because the daemon writes each ``message_id`` once.

On a Redis Cluster each message goes to its partition's sharded channel (``SPUBLISH``), the
partition being ``crc32(message_id) mod PARTITIONS``: the rule any other publisher follows. In
a failover the new primary can take a ``SPUBLISH`` before the subscribers are back on it, and
replies 0: ``retry_unreceived`` publishes those again once they have re-subscribed. A replica
takes ``SPUBLISH`` too and replies 0 (an old primary restarted after a failover, still in the
client's layout, is one), so a 0 on a cluster also makes us read the layout again.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TextIO

import redis

from processor.config import PublisherSettings
from processor.errors import RetryGaveUp, RetryStopped
from processor.observe.logs import Tagged
from processor.store.connection import command_client, refused_database, reread_layout
from processor.store.keys import channels
from processor.store.outage import Backoff, Outage, Retrier
from processor.store.partitions import partition_of

log = logging.getLogger(__name__)

RETRY_AFTER_S = 0.5
RETRY_TAIL_S = 10.0
# On a cluster, the least time between two re-reads of the layout after unreceived messages.
LAYOUT_EVERY_S = 1.0
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


@dataclass
class PublishReport:
    published: int = 0
    unreceived: int = 0
    republished: int = 0
    still_unreceived: int = 0
    elapsed_s: float = 0.0
    # Why the run ended without Redis (unreachable, or refusing us); empty if it ended with it.
    unavailable: str = ""

    @property
    def rate(self) -> float:
        return self.published / self.elapsed_s if self.elapsed_s else 0.0

    def line(self) -> str:
        return (
            f"published {self.published:,} messages in {self.elapsed_s:.1f} s "
            f"({self.rate:,.0f} msg/s); reached no subscriber: {self.unreceived:,}"
            f" (re-published {self.republished:,}, still unreceived {self.still_unreceived:,})"
        )


def make_message(rng: random.Random) -> tuple[str, bytes]:
    message_id = str(uuid.uuid4())
    body = {
        "message_id": message_id,
        "published_at": round(time.time(), 6),
        "source": "publish.py",
        "text": " ".join(rng.choices(_WORDS, k=6)),
    }
    return message_id, json.dumps(body, separators=(",", ":")).encode()


class Publisher:
    def __init__(self, settings: PublisherSettings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self._client: redis.Redis | None = None
        self._channels = channels(settings)
        self._sharded = settings.redis_cluster
        self._layout_read_at = 0.0
        self._rng = random.Random()
        self._retries: deque[tuple[float, str, bytes]] = deque()
        self._outage = Outage(
            "Redis (publish)", Tagged(log, lambda: "[publisher]"), url=settings.url
        )
        self._retrier = Retrier(self._outage, Backoff(0.05, 2.0), self.stop)
        self.report = PublishReport()

    def run(self) -> PublishReport:
        settings = self.settings
        record = open(settings.record, "a", encoding="utf-8") if settings.record else None  # noqa: SIM115
        started = time.monotonic()
        ends_at = started + settings.target_duration_s
        next_progress = started + settings.progress_interval_s
        next_burst = started
        try:
            while not self.stop.is_set() and time.monotonic() < ends_at:
                burst = [make_message(self._rng) for _ in range(settings.batch_size)]
                if self._publish(burst, record, first_time=True, until=ends_at):
                    self._retry_due(record, until=ends_at)
                next_burst = self._next_burst(next_burst)
                if time.monotonic() >= next_progress:
                    next_progress += settings.progress_interval_s
                    self.report.elapsed_s = time.monotonic() - started
                    log.info("progress: %s", self.report.line())
                self.stop.wait(max(0.0, min(next_burst, ends_at) - time.monotonic()))
            self.report.elapsed_s = time.monotonic() - started
            if self._outage.active:
                self._gave_up()
            else:
                self._retry_tail(record)
        finally:
            if record is not None:
                record.close()
            if self._client is not None:
                self._client.close()
        self.report.still_unreceived = len(self._retries) if settings.retry_unreceived else 0
        return self.report

    def _next_burst(self, previous: float) -> float:
        settings = self.settings
        if settings.rate:
            # Steady rate: bursts on a fixed schedule, catching up if we fell behind.
            return max(previous + settings.batch_size / settings.rate, time.monotonic() - 1.0)
        pause_ms = self._rng.uniform(settings.pause_min_ms, settings.pause_max_ms)
        return time.monotonic() + pause_ms / 1000

    def _gave_up(self) -> None:
        """The run ended while Redis was away or refusing us: say why nothing more went out."""
        self.report.unavailable = self._outage.describe()
        log.error(
            "[publisher] stopped with Redis unavailable for %.1f s (%s): messages due meanwhile "
            "were not published",
            self._outage.length_s(),
            self.report.unavailable,
        )

    def _publish(
        self, burst: list[tuple[str, bytes]], record: TextIO | None, first_time: bool, until: float
    ) -> bool:
        """Publishes ``burst``, retrying while Redis is away until ``until`` (monotonic) or a
        stop; False if it gave up (``burst`` not published)."""
        try:
            receivers = self._retrier.call(partial(self._send, burst), deadline=until)
        except (RetryStopped, RetryGaveUp):
            return False
        now = time.monotonic()
        if self._sharded and 0 in receivers and now - self._layout_read_at >= LAYOUT_EVERY_S:
            self._layout_read_at = now
            assert self._client is not None  # made by the call that just went through
            reread_layout(self._client)
        if record is not None:
            record.write(
                "".join(
                    f"{message_id} {count}\n"
                    for (message_id, _), count in zip(burst, receivers, strict=True)
                )
            )
            record.flush()
        for (message_id, payload), count in zip(burst, receivers, strict=True):
            if count == 0:
                if first_time:
                    self.report.unreceived += 1
                if self.settings.retry_unreceived:
                    self._retries.append((now + RETRY_AFTER_S, message_id, payload))
        if first_time:
            self.report.published += len(burst)
        else:
            self.report.republished += len(burst)
        return True

    def _send(self, burst: list[tuple[str, bytes]]) -> list[int]:
        """One attempt at publishing ``burst``: how many subscribers received each message."""
        if self._client is None:
            # Made here, inside the retry: a cluster client reads the layout as it is made.
            self._client = command_client(self.settings, name="processor-publisher")
        partitions = len(self._channels)
        with refused_database(self.settings), self._client.pipeline(False) as pipe:
            publish = pipe.spublish if self._sharded else pipe.publish
            for message_id, payload in burst:
                publish(self._channels[partition_of(message_id, partitions)], payload)
            receivers: list[int] = pipe.execute()
        return receivers

    def _retry_due(self, record: TextIO | None, until: float) -> None:
        now = time.monotonic()
        due: list[tuple[str, bytes]] = []
        while self._retries and self._retries[0][0] <= now:
            _, message_id, payload = self._retries.popleft()
            due.append((message_id, payload))
        if due:
            self._publish(due, record, first_time=False, until=until)

    def _retry_tail(self, record: TextIO | None) -> None:
        """After the run, keeps re-publishing unreceived messages for a while."""
        deadline = time.monotonic() + RETRY_TAIL_S
        while self._retries and time.monotonic() < deadline and not self.stop.is_set():
            self.stop.wait(max(0.0, self._retries[0][0] - time.monotonic()))
            self._retry_due(record, until=deadline)
