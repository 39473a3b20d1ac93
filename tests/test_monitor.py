"""The throughput line: a line per interval while anything moves, one a minute at idle."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator

import pytest
import redis

from processor.config import Settings
from processor.consumer.stats import ConsumerStats
from processor.observe.monitor import Monitor

INTERVAL_S = Settings().monitor_interval_s
IDLE_INTERVAL_S = Settings().monitor_idle_interval_s


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stats() -> ConsumerStats:
    local = ConsumerStats(multiprocessing.get_context("spawn"))
    local.consumer_id = "c-1"
    return local


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def monitor(redis_url: str, stats: ConsumerStats, clock: FakeClock) -> Iterator[Monitor]:
    watcher = Monitor(Settings(redis_url=redis_url), lambda: [stats], clock=clock)
    try:
        yield watcher
    finally:
        watcher.close()


def _lines(caplog: pytest.LogCaptureFixture, monitor: Monitor, clock: FakeClock) -> list[str]:
    """The lines one more report logs, MONITORING_INTERVAL later."""
    caplog.clear()
    clock.now += INTERVAL_S
    with caplog.at_level(logging.INFO, logger="processor.observe.monitor"):
        monitor.report()
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "processor.observe.monitor"
    ]


def test_at_idle_the_line_comes_once_a_minute_not_every_interval(
    monitor: Monitor, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(_lines(caplog, monitor, clock)) == 1  # the first, with the totals
    assert len(_lines(caplog, monitor, clock)) == 1  # the first with rates: 0/s
    quiet = int(IDLE_INTERVAL_S // INTERVAL_S) - 1
    assert [_lines(caplog, monitor, clock) for _ in range(quiet)] == [[]] * quiet
    (line,) = _lines(caplog, monitor, clock)
    assert "0 msg/s written, 0/s dead | local c-1=0/s | gaps 0" in line
    assert _lines(caplog, monitor, clock) == []


def test_any_change_is_reported_at_once_then_the_return_to_idle(
    monitor: Monitor,
    clock: FakeClock,
    stats: ConsumerStats,
    r: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _lines(caplog, monitor, clock)
    _lines(caplog, monitor, clock)
    assert _lines(caplog, monitor, clock) == []

    stats.add("written", 30)
    r.hincrby("processor:stats", "written", 30)
    (busy,) = _lines(caplog, monitor, clock)
    assert "10 msg/s written" in busy and "c-1=10/s" in busy
    (back_to_idle,) = _lines(caplog, monitor, clock)
    assert "0 msg/s written" in back_to_idle
    assert _lines(caplog, monitor, clock) == []

    # Received but not yet written (a slow handler): not idle, though no figure on the line moved.
    stats.add("received", 5)
    assert len(_lines(caplog, monitor, clock)) == 1
    assert _lines(caplog, monitor, clock) == []

    # What the takeover buffer holds, as it fills and as it drains.
    stats.set(buffered=524)
    (held,) = _lines(caplog, monitor, clock)
    assert "buffered=524" in held
    assert _lines(caplog, monitor, clock) == []
    stats.set(buffered=0)
    (drained,) = _lines(caplog, monitor, clock)
    assert "buffered" not in drained

    r.xadd("processor:gaps", {"start_ms": 1000, "end_ms": 1500})
    (gap,) = _lines(caplog, monitor, clock)
    assert "gaps 1 (longest 0.500 s)" in gap


def test_the_final_line_is_always_logged(
    monitor: Monitor, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    _lines(caplog, monitor, clock)
    _lines(caplog, monitor, clock)
    assert _lines(caplog, monitor, clock) == []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="processor.observe.monitor"):
        monitor.report(final=True)
    assert caplog.records[-1].getMessage().startswith("final throughput group")
