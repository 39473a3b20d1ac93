"""A consumer's counters: its totals, and those it shares with its supervisor in shared memory
(no locks: each value has one writer)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

# "ready": 1 while the consumer is subscribed and registered (the supervisor's /readyz);
# "receiving": 1 while it is subscribed (a reader) or fed (a fed consumer).
# "held": messages received and not written yet, as of the consumer's last heartbeat (what a
# forced stop of it loses). "reader": 1 for a reader (it subscribes), 0 for a fed consumer;
# "feeds": how many consumers a reader feeds.
FIELDS = (
    "received",
    "written",
    "dead",
    "skipped",
    "taken_over",
    "gaps",
    "buffered",
    "held",
    "ready",
    "receiving",
    "reader",
    "feeds",
)


# Summed over the consumers that filled a slot; the other fields are the current consumer's.
ADDED = ("written", "dead", "skipped", "taken_over")


class ConsumerStats:
    """One consumer slot's counters and current id; picklable to a spawned child.

    The supervisor writes them before it starts a consumer, and the consumer's heartbeat thread
    alone while the consumer runs (it goes on while a handler holds up the consumer's loop).
    Each report is stamped: a consumer stopped, or whose heartbeat thread is stuck, writes
    nothing, so its last values are believed only while the stamp is recent (:meth:`age_s`).
    """

    def __init__(self, context: BaseContext) -> None:
        self._values: Any = context.RawArray("q", len(FIELDS))
        self._ident: Any = context.RawArray("c", 160)
        # time.monotonic() of the last report: one clock for every process of the host.
        self._reported: Any = context.RawValue("d", float("-inf"))

    def set(self, **values: int) -> None:
        for name, value in values.items():
            self._values[FIELDS.index(name)] = value

    def add(self, name: str, amount: int) -> None:
        self._values[FIELDS.index(name)] += amount

    def get(self, name: str) -> int:
        return int(self._values[FIELDS.index(name)])

    def reported(self) -> None:
        """Stamps the values just set as current."""
        self._reported.value = time.monotonic()

    def reported_once(self) -> bool:
        """Its consumer has reported since the slot was (re)started."""
        return self.age_s() != float("inf")

    def age_s(self) -> float:
        """Seconds since the last report (infinite before the first)."""
        return time.monotonic() - float(self._reported.value)

    def starting(self) -> None:
        """Before a new consumer fills the slot: not ready, and nothing reported yet."""
        self.set(ready=0, receiving=0)
        self._reported.value = float("-inf")

    def snapshot(self) -> dict[str, int]:
        return {name: int(self._values[index]) for index, name in enumerate(FIELDS)}

    @property
    def consumer_id(self) -> str:
        return bytes(self._ident.value).decode()

    @consumer_id.setter
    def consumer_id(self, value: str) -> None:
        self._ident.value = value.encode()[:159]


class RateMeter:
    """A rate over the last ``window_s`` seconds, from a growing total sampled now and then."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def rate(self, total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window_s:
            self._samples.popleft()
        first_time, first_total = self._samples[0]
        elapsed = now - first_time
        return (total - first_total) / elapsed if elapsed > 0 else 0.0


class BusyMeter:
    """The share of wall time spent working over the last ``window_s`` (for autoscale).

    One thread adds the time it worked; another reads the share now and then. A window of a
    few seconds, not the time since the last reading, so a pause between two bursts does not
    read as an idle group.
    """

    def __init__(self, window_s: float = 5.0) -> None:
        self._busy_s = 0.0  # written by the working thread only
        self._meter = RateMeter(window_s)  # used by the reading thread only

    def add(self, seconds: float) -> None:
        self._busy_s += seconds

    def share(self, now: float | None = None) -> float:
        return min(1.0, self._meter.rate(self._busy_s, now))


@dataclass(slots=True)
class WriteCounts:
    """What the write thread counts, written by it alone."""

    written: int = 0
    dead: int = 0
    skipped: int = 0
    unconfirmed: int = 0
    # Batches still unwritten when a stop's grace ran out.
    lost: int = 0


@dataclass(slots=True)
class LoopCounts:
    """What the consumer loop counts, written by it alone."""

    taken_over: int = 0
    # What it still held once its threads had stopped.
    lost: int = 0
    left_to_takeover: int = 0


@dataclass(frozen=True, slots=True)
class Totals:
    written: int
    dead: int
    skipped: int
    unconfirmed: int
    taken_over: int
    lost: int
    left_to_takeover: int


class ConsumerTotals:
    """A consumer's totals since it started: each field has one writing thread, and any thread
    reads them through :meth:`snapshot`."""

    def __init__(self) -> None:
        self.writes = WriteCounts()
        self.loop = LoopCounts()

    def snapshot(self) -> Totals:
        writes, loop = self.writes, self.loop
        return Totals(
            written=writes.written,
            dead=writes.dead,
            skipped=writes.skipped,
            unconfirmed=writes.unconfirmed,
            taken_over=loop.taken_over,
            lost=writes.lost + loop.lost,
            left_to_takeover=loop.left_to_takeover,
        )
