"""HANDLER_RETRIES: a message the handler raised on is tried again after 0.1 s, 0.2 s, ...
before it is dead-lettered; the pauses once per batch, a time-out not retried, each try on the
message as received; and a daemon whose handler fails twice per message writes them all."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from processor.config import Settings
from processor.consumer.messages import Message, parse
from processor.errors import ConfigError
from processor.handlers import Failure, InlineRunner, run_with_retries
from processor.loading import load_daemon_settings
from processor.store.keys import Keys
from tests import handlers_for_tests as th
from tests.conftest import Processes
from tests.faults_support import client, start_daemon
from tests.helpers import wait_until


class Pauses(threading.Event):
    """A stop event that records the pauses asked of it instead of waiting them out."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.asked.append(timeout or 0.0)
        return self.is_set()


def _messages(*ids: str) -> list[Message]:
    messages = [parse(json.dumps({"message_id": item}).encode(), 1024) for item in ids]
    assert all(isinstance(message, Message) for message in messages)
    return messages  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _fresh_tries() -> None:
    th.TRIES.clear()


def test_failures_are_retried_together_with_doubling_pauses() -> None:
    pauses = Pauses()
    runner = InlineRunner(th.fails_twice_then_works, 0)
    results = run_with_retries(runner, _messages("a", "b", "c"), 3, pauses)
    # Three messages failing twice each: two rounds, one pause each, not one per message.
    assert pauses.asked == [0.1, 0.2]
    assert results == [{"message_id": item} for item in ("a", "b", "c")]  # as received
    assert th.TRIES == {"a": 3, "b": 3, "c": 3}


def test_a_message_still_failing_after_the_retries_is_a_failure() -> None:
    pauses = Pauses()
    results = run_with_retries(
        InlineRunner(th.fails_twice_then_works, 0), _messages("a"), 1, pauses
    )
    (failure,) = results
    assert isinstance(failure, Failure)
    assert failure.reason == "handler raised RuntimeError: try 2 of a"
    assert pauses.asked == [0.1]


def test_no_retries_by_default_and_none_for_a_success() -> None:
    pauses = Pauses()
    failed = run_with_retries(InlineRunner(th.raises, 0), _messages("a"), 0, pauses)
    assert isinstance(failed[0], Failure)
    assert run_with_retries(InlineRunner(th.echo, 0), _messages("b"), 5, pauses) == [
        {"message_id": "b"}
    ]
    assert pauses.asked == []


class TimesOut:
    """A runner whose every call times out, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, messages: Sequence[dict[str, Any]]) -> list[object]:
        self.calls += 1
        return [Failure("handler timed out after 5 s") for _ in messages]

    def close(self) -> None:
        return None


def test_a_time_out_is_not_retried() -> None:
    runner = TimesOut()
    results = run_with_retries(runner, _messages("a"), 3, Pauses())  # type: ignore[arg-type]
    assert runner.calls == 1
    assert isinstance(results[0], Failure)


def test_handler_retries_is_a_setting_of_at_most_five() -> None:
    assert Settings().handler_retries == 0
    assert load_daemon_settings([], {"HANDLER_RETRIES": "3"}).handler_retries == 3
    with pytest.raises(ConfigError, match="HANDLER_RETRIES"):
        load_daemon_settings([], {"HANDLER_RETRIES": "6"})


def test_a_daemon_with_retries_writes_messages_its_handler_failed_twice_on(
    procs: Processes, redis_url: str
) -> None:
    keys = Keys.from_settings(Settings())
    start_daemon(
        procs,
        redis_url,
        "partitioned",
        count=2,
        HANDLER="tests.handlers_for_tests:fails_twice_then_works",
        HANDLER_RETRIES="2",
    )
    redis = client(redis_url)
    try:
        for n in range(10):
            assert redis.publish(keys.channel, json.dumps({"message_id": f"r-{n}"})) == 2
        wait_until(lambda: redis.xlen(keys.output) == 10, 30)
        assert redis.xlen(keys.dead) == 0
        written = {fields[b"message_id"] for _, fields in redis.xrange(keys.output)}
        assert written == {f"r-{n}".encode() for n in range(10)}
    finally:
        redis.close()
