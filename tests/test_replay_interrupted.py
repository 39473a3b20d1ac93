"""``processor replay`` stopped by SIGINT or SIGTERM halfway through many dead letters, against
a real redis-server: it says what it replayed as it goes, stops between two dead letters with a
count of what is left, no traceback, and exits 128 + the signal's number."""

from __future__ import annotations

import json
import re
import signal

import pytest
import redis

from processor.errors import ExitCode
from processor.store.keys import Keys
from tests.conftest import Processes
from tests.helpers import list_live_consumer, wait_until

LETTERS = 20_000


@pytest.fixture
def subscribed(r: redis.Redis, keys: Keys, subscriber: redis.client.PubSub) -> redis.client.PubSub:
    """A listed consumer with a live heartbeat, and a subscriber standing in for it."""
    list_live_consumer(r, keys, ttl_ms=120_000)
    return subscriber


def _dead_letters(client: redis.Redis, keys: Keys, count: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        for n in range(count):
            raw = json.dumps({"message_id": f"m-{n}"})
            fields = {"message_id": f"m-{n}", "reason_code": "handler_error", "raw": raw}
            pipe.xadd(keys.dead, fields)  # type: ignore[arg-type]
        pipe.execute()


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGINT, ExitCode.INTERRUPTED), (signal.SIGTERM, ExitCode.TERMINATED)],
    ids=["sigint", "sigterm"],
)
def test_an_interrupted_replay_says_what_it_replayed_and_what_is_left(
    procs: Processes,
    redis_url: str,
    client: redis.Redis,
    keys: Keys,
    subscribed: redis.client.PubSub,
    sig: signal.Signals,
    code: ExitCode,
) -> None:
    _dead_letters(client, keys, LETTERS)
    replay = procs.start(["-m", "processor", "replay", "--redis-url", redis_url, "--all"])
    wait_until(lambda: client.xlen(keys.dead) <= LETTERS - 500, 30)
    replay.send_signal(sig)
    assert replay.wait(10) == code
    lines = procs.output(replay).splitlines()
    assert "Traceback" not in procs.output(replay)
    left = client.xlen(keys.dead)
    assert left > 0, "the replay ended before the signal: too few dead letters to interrupt"
    # One line per dead letter replayed (and gone from the stream), each said as it went.
    replayed = [line for line in lines if "replayed, received by 1 subscribers" in line]
    assert len(replayed) == LETTERS - left
    assert lines[-1] == (
        f"interrupted by {sig.name}: {len(replayed)} of {LETTERS} dead letters replayed; "
        f"{left} not tried, left in the stream (run the command again for them)"
    )
    assert len(lines) == len(replayed) + 1, lines[-5:]
    assert re.fullmatch(r"\d+-\d+  m-0  handler_error: replayed, .*", lines[0])
