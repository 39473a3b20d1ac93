"""Handlers: the default one, loading a user's, and the runners (errors, timeouts, overlap)."""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from processor.errors import ConfigError, HandlerLoadError
from processor.handlers import (
    AsyncRunner,
    Failure,
    FailureLog,
    InlineRunner,
    Runner,
    ThreadedRunner,
    add_random_score,
    load_handler,
    make_runner,
)
from tests import handlers_for_tests as th
from tests.helpers import logged, tagged

DEFAULT_PROPERTIES = {"score", "rank", "weight", "priority", "confidence"}


def _messages(count: int) -> list[dict[str, object]]:
    return [{"message_id": f"m-{index}", "index": index} for index in range(count)]


@pytest.fixture(autouse=True)
def _released_sleepers() -> Iterator[None]:
    th.RELEASE.clear()
    th.IN_FLIGHT.reset()
    yield
    # Frees pool threads still stuck in sleeps_forever, so none outlives the test.
    th.RELEASE.set()


@pytest.fixture
def alarm_restored() -> Iterator[None]:
    """InlineRunner takes over SIGALRM; give pytest-timeout its handler and timer back."""
    handler = signal.getsignal(signal.SIGALRM)
    delay, interval = signal.getitimer(signal.ITIMER_REAL)
    yield
    signal.signal(signal.SIGALRM, handler)
    if delay:
        signal.setitimer(signal.ITIMER_REAL, delay, interval)


# -- the default handler --------------------------------------------------------------------


def test_default_handler_adds_one_random_property() -> None:
    for _ in range(50):
        message = {"message_id": "m-1", "text": "keep me", "nested": {"a": [1]}}
        result = add_random_score(dict(message))
        added = set(result) - set(message)
        assert len(added) == 1
        (name,) = added
        assert name in DEFAULT_PROPERTIES
        assert isinstance(result[name], float)
        assert 0.0 <= result[name] <= 1.0
        assert {key: result[key] for key in message} == message


# -- load_handler ---------------------------------------------------------------------------


def test_load_handler_finds_functions() -> None:
    assert load_handler("processor.handlers:add_random_score") is add_random_score
    assert load_handler("tests.handlers_for_tests:async_echo") is th.async_echo
    assert load_handler("tests.handlers_for_tests:IN_FLIGHT.reset") == th.IN_FLIGHT.reset


def test_a_handler_module_in_the_working_directory_is_found_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd_only_handler.py").write_text("def echo(message):\n    return message\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".")])
    handler = load_handler("cwd_only_handler:echo")
    assert handler({"a": 1}) == {"a": 1}
    # Last, so a stray module there named like a library the daemon imports cannot replace it.
    assert sys.path[-1] == str(tmp_path)
    load_handler("cwd_only_handler:echo")
    assert sys.path.count(str(tmp_path)) == 1
    del sys.modules["cwd_only_handler"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("processor.handlers.add_random_score", "expected package.module:function"),
        ("processor.handlers:", "expected package.module:function"),
        (":add_random_score", "expected package.module:function"),
        ("nosuch.module:fn", "cannot import"),
        ("processor.handlers:nosuch", "has no nosuch"),
        ("tests.handlers_for_tests:NOT_CALLABLE", "not callable"),
    ],
)
def test_load_handler_errors_name_the_setting(spec: str, words: str) -> None:
    with pytest.raises(HandlerLoadError) as caught:
        load_handler(spec)
    message = str(caught.value)
    assert "HANDLER" in message
    assert spec in message
    assert words in message
    assert isinstance(caught.value, ConfigError)  # so the entry point exits 2


def test_make_runner_picks_the_runner() -> None:
    runners = [
        make_runner(th.async_echo, 1.0, 1),
        make_runner(th.echo, 1.0, 4),
        make_runner(th.echo, 0.0, 1),
    ]
    try:
        assert [type(runner) for runner in runners] == [AsyncRunner, ThreadedRunner, InlineRunner]
    finally:
        for runner in runners:
            runner.close()


# -- InlineRunner ---------------------------------------------------------------------------


def test_inline_runner_returns_results_in_order(alarm_restored: None) -> None:
    runner = InlineRunner(th.slow_10ms, timeout_s=1.0)
    try:
        messages = _messages(5)
        assert runner.run(messages) == messages
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left armed
    finally:
        runner.close()


def test_inline_runner_turns_exceptions_into_failures() -> None:
    runner = InlineRunner(th.raises, timeout_s=0)
    try:
        (result,) = runner.run(_messages(1))
        assert isinstance(result, Failure)
        assert "ValueError" in result.reason
        assert "boom for m-0" in result.reason
    finally:
        runner.close()


def test_inline_runner_enforces_the_timeout(alarm_restored: None) -> None:
    runner = InlineRunner(th.sleeps_forever, timeout_s=0.2)
    try:
        started = time.monotonic()
        results = runner.run(_messages(2))
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    assert all(isinstance(result, Failure) for result in results)
    assert all("timed out" in result.reason for result in results)  # type: ignore[union-attr]
    assert elapsed < 3.0  # two calls of 0.2 s, not two of 10 s
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# -- ThreadedRunner -------------------------------------------------------------------------


def test_threaded_runner_calls_overlap() -> None:
    runner = ThreadedRunner(th.slow_100ms, timeout_s=5.0, concurrency=16)
    try:
        messages = _messages(16)
        started = time.monotonic()
        results = runner.run(messages)
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    assert results == messages  # in order
    assert elapsed < 1.0  # 16 x 0.1 s in sequence would be 1.6 s
    assert th.IN_FLIGHT.peak > 1


def test_threaded_runner_respects_concurrency() -> None:
    runner = ThreadedRunner(th.slow_100ms, timeout_s=5.0, concurrency=3)
    try:
        assert runner.run(_messages(9)) == _messages(9)
    finally:
        runner.close()
    assert 1 < th.IN_FLIGHT.peak <= 3


def test_threaded_runner_turns_exceptions_into_failures() -> None:
    runner = ThreadedRunner(th.raises, timeout_s=1.0, concurrency=2)
    try:
        results = runner.run(_messages(3))
    finally:
        runner.close()
    assert [isinstance(result, Failure) for result in results] == [True, True, True]
    assert "boom for m-2" in results[2].reason  # type: ignore[union-attr]


def test_threaded_runner_timeout_becomes_failure() -> None:
    runner = ThreadedRunner(th.sleeps_forever, timeout_s=0.2, concurrency=2)
    try:
        started = time.monotonic()
        (result,) = runner.run(_messages(1))
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    assert isinstance(result, Failure)
    assert "timed out" in result.reason
    assert elapsed < 3.0


def test_threaded_runner_times_out_concurrent_calls_together() -> None:
    # Eight calls that started together and hang are all past their time after 0.3 s: the
    # batch must not take 8 x 0.3 s.
    runner = ThreadedRunner(th.sleeps_forever, timeout_s=0.3, concurrency=8)
    try:
        started = time.monotonic()
        results = runner.run(_messages(8))
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    assert all(isinstance(result, Failure) for result in results)
    assert elapsed < 1.5


# -- AsyncRunner ----------------------------------------------------------------------------


def test_async_runner_calls_overlap() -> None:
    runner = AsyncRunner(th.async_slow_100ms, timeout_s=5.0, concurrency=16)
    try:
        messages = _messages(16)
        started = time.monotonic()
        results = runner.run(messages)
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    assert results == messages
    assert elapsed < 1.0
    assert th.IN_FLIGHT.peak == 16


def test_async_runner_respects_concurrency() -> None:
    runner = AsyncRunner(th.async_slow_100ms, timeout_s=5.0, concurrency=4)
    try:
        assert runner.run(_messages(12)) == _messages(12)
    finally:
        runner.close()
    assert th.IN_FLIGHT.peak == 4


def test_async_runner_turns_exceptions_and_timeouts_into_failures() -> None:
    runner = AsyncRunner(th.async_raises, timeout_s=1.0, concurrency=4)
    try:
        (raised,) = runner.run(_messages(1))
    finally:
        runner.close()
    assert isinstance(raised, Failure)
    assert "async boom for m-0" in raised.reason

    runner = AsyncRunner(th.async_sleeps_forever, timeout_s=0.2, concurrency=8)
    try:
        started = time.monotonic()
        results = runner.run(_messages(8))
        elapsed = time.monotonic() - started
    finally:
        runner.close()
    assert all(isinstance(result, Failure) for result in results)
    assert all("timed out" in result.reason for result in results)  # type: ignore[union-attr]
    assert elapsed < 1.5


def test_async_runner_is_reusable_across_batches() -> None:
    runner = AsyncRunner(th.async_echo, timeout_s=1.0, concurrency=2)
    try:
        assert runner.run(_messages(3)) == _messages(3)
        assert runner.run(_messages(2)) == _messages(2)
    finally:
        runner.close()


def test_non_dict_result_is_passed_back_for_the_consumer_to_dead_letter() -> None:
    runner = InlineRunner(th.returns_non_dict, timeout_s=0)
    try:
        assert runner.run(_messages(1)) == [["m-0"]]
    finally:
        runner.close()


# -- failures in the log ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _raised(count: int) -> list[Failure]:
    runner = InlineRunner(th.raises, timeout_s=0)
    try:
        results = runner.run(_messages(count))
    finally:
        runner.close()
    assert all(isinstance(result, Failure) for result in results)
    return results  # type: ignore[return-value]


def _failure_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "processor.handlers"]


def test_the_first_failure_of_each_kind_is_logged_with_its_traceback_then_only_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    failures = FailureLog(3.0, tagged("[c-1 pid=1]"), clock)
    caplog.set_level(logging.INFO, logger="processor.handlers")

    raised = _raised(50)
    for index, failure in enumerate(raised):
        failures.failed(f"m-{index}", failure.reason, failure.error)
    for index in range(7):
        failures.failed(f"t-{index}", "handler timed out after 5 s")
    failures.failed("r-0", "handler returned list, not a dict")
    clock.now += 2.9
    failures.report()

    first, timeout, result = _failure_lines(caplog)
    assert first.levelno == logging.ERROR
    assert logged(first).startswith("[c-1 pid=1] handler failed (ValueError) on message_id")
    assert "'m-0': handler raised ValueError: boom for m-0" in logged(first)
    assert first.exc_info is not None and first.exc_info[1] is raised[0].error
    assert 'raise ValueError(f"boom for' in caplog.text  # the handler's own line
    assert "(timeout) on message_id 't-0': handler timed out after 5 s" in logged(timeout)
    assert timeout.exc_info is None
    assert "(bad result) on message_id 'r-0'" in logged(result)

    caplog.clear()
    clock.now += 0.1
    failures.report()
    (counted,) = _failure_lines(caplog)
    assert counted.levelno == logging.WARNING
    assert logged(counted) == (
        "[c-1 pid=1] handler failed 58 times in the last 3.0 s "
        "(ValueError 50, timeout 7, bad result 1); the first of each kind is logged above"
    )

    # Nothing failed since: no line. The same kinds again: counted, never logged one by one.
    caplog.clear()
    clock.now += 10
    failures.report()
    assert not _failure_lines(caplog)
    for index, failure in enumerate(_raised(5)):
        failures.failed(f"again-{index}", failure.reason, failure.error)
    assert not _failure_lines(caplog)
    clock.now += 3
    failures.report()
    assert [logged(record) for record in _failure_lines(caplog)] == [
        "[c-1 pid=1] handler failed 5 times in the last 3.0 s (ValueError 5); "
        "the first of each kind is logged above"
    ]


def test_a_final_report_counts_what_is_left_before_the_interval_is_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    failures = FailureLog(3.0, tagged("[c-1 pid=1]"), clock)
    caplog.set_level(logging.INFO, logger="processor.handlers")
    failures.failed("m-0", "handler timed out after 5 s")
    clock.now += 0.5
    failures.report()
    assert len(_failure_lines(caplog)) == 1
    failures.report(final=True)
    assert logged(_failure_lines(caplog)[-1]).startswith(
        "[c-1 pid=1] handler failed 1 time in the last 0.5 s (timeout 1)"
    )


@pytest.mark.parametrize(
    "runner",
    [
        lambda: InlineRunner(th.raises, timeout_s=0),
        lambda: ThreadedRunner(th.raises, timeout_s=1.0, concurrency=2),
        lambda: AsyncRunner(th.async_raises, timeout_s=1.0, concurrency=2),
    ],
    ids=["inline", "threaded", "async"],
)
def test_every_runner_hands_back_the_exception_for_its_traceback(
    runner: Callable[[], Runner],
) -> None:
    instance = runner()
    try:
        (failure,) = instance.run(_messages(1))
    finally:
        instance.close()
    assert isinstance(failure, Failure)
    assert isinstance(failure.error, ValueError)
    assert failure.error.__traceback__ is not None
