"""The one retry loop: what it retries, how it logs, when it stops or gives up."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import redis

from processor.errors import RetryGaveUp, RetryStopped
from processor.store import outage as outages
from processor.store.outage import Backoff, Outage, Retrier
from tests.helpers import logged, tagged

REFUSED = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


def failing(times: int, error: Exception = REFUSED) -> Callable[[], str]:
    """A call that fails ``times`` times, then answers "ok"."""
    calls = {"n": 0}

    def do() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return "ok"

    return do


class CountingBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(0.001, 0.001)
        self.delays = 0
        self.resets = 0

    def next_delay(self) -> float:
        self.delays += 1
        return super().next_delay()

    def reset(self) -> None:
        self.resets += 1
        super().reset()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [logged(record) for record in caplog.records if record.name == outages.__name__]


def test_a_call_is_retried_until_it_succeeds_logging_the_outage_once_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=outages.__name__)
    backoff = CountingBackoff()
    retrier = Retrier(Outage("Redis (test)", tagged("[c1]")), backoff, threading.Event())
    assert retrier.call(failing(3)) == "ok"
    assert backoff.delays == 3 and backoff.resets == 1
    start, back = lines(caplog)
    assert start.startswith("[c1] Redis (test) unavailable: Error 111")
    assert back.startswith("[c1] Redis (test) back after ") and back.endswith("(3 failed attempts)")
    assert not retrier.outage.active


def test_an_error_that_is_not_retried_reaches_the_caller_at_once() -> None:
    backoff = CountingBackoff()
    retrier = Retrier(Outage("Redis (test)"), backoff, errors=(redis.ConnectionError,))
    with pytest.raises(redis.ResponseError):
        retrier.call(failing(1, redis.ResponseError("ERR unknown command")))
    assert backoff.delays == 0 and not retrier.outage.active


def test_a_stop_during_the_back_off_ends_the_retries() -> None:
    stop = threading.Event()
    stop.set()  # the first pause returns at once
    retrier = Retrier(Outage("Redis (test)"), Backoff(60.0, 60.0), stop)
    started = time.monotonic()
    with pytest.raises(RetryStopped):
        retrier.call(failing(1))
    assert time.monotonic() - started < 30.0  # not the 30-60 s pause


def test_without_a_stop_event_the_back_off_is_slept_through() -> None:
    stop = threading.Event()
    stop.set()
    # The writer's way: its stop event is not the Retrier's, so a stop never cuts a retry short.
    retrier = Retrier(Outage("Redis (test)"), CountingBackoff())
    assert retrier.call(failing(2)) == "ok"


def test_past_its_deadline_a_failure_gives_up_and_no_pause_outlasts_the_deadline() -> None:
    retrier = Retrier(Outage("Redis (test)"), Backoff(60.0, 60.0), threading.Event())
    deadline = time.monotonic() + 0.2
    with pytest.raises(RetryGaveUp, match="failed attempt"):
        retrier.call(failing(1000), deadline=deadline)
    assert time.monotonic() - deadline < 30.0  # the 30-60 s pause was cut at the deadline
    assert retrier.outage.active  # given up, not recovered


def test_on_error_hears_of_each_failure_after_it_is_logged_and_may_end_the_retries() -> None:
    retrier = Retrier(Outage("Redis (test)"), CountingBackoff(), threading.Event())
    seen: list[bool] = []

    def on_error(error: BaseException) -> None:
        seen.append(retrier.outage.active and retrier.outage.error is error)
        if len(seen) == 3:
            raise RetryGaveUp("enough")

    with pytest.raises(RetryGaveUp, match="enough"):
        retrier.call(failing(1000), on_error=on_error)
    assert seen == [True, True, True]


def test_the_end_of_an_outage_is_told_to_its_listener_by_what_it_was_about() -> None:
    heard: list[str] = []
    outage = Outage("Redis (writes)", on_recovered=heard.append)
    outage.recovered()  # no outage on: nothing to tell
    outage.failed(REFUSED)
    outage.recovered()
    assert heard == ["Redis (writes)"]
