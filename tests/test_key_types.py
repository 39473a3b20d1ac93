"""A key of the wrong type: refused at start with one line, waited out at run time.

The daemon runs as a process against the suite's redis-server. At start a key it writes that
holds another type is a wrong setting (exit 2, one line naming the key, its type and the
setting); set while the daemon runs, it is an outage: every consumer holds what it received,
retries, and writes it all once the key is gone, with no consumer replaced.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from processor.consumer.dedup import Window
from tests.conftest import REPO_ROOT
from tests.faults_support import (
    FAST_SETTINGS,
    Expected,
    check_streams,
    client,
    daemon_env,
    publish_invalid,
    settle,
    start_daemon,
    start_publisher,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)


def _consume(redis_url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = daemon_env(redis_url, "partitioned", 2, {})
    return subprocess.run(
        [sys.executable, "demo/consume.py", *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
    )


@pytest.mark.parametrize(
    ("prepare", "key", "held", "setting"),
    [
        (
            lambda r: r.set("messages:processed", "x"),
            "messages:processed",
            "string",
            "OUTPUT_STREAM",
        ),
        (lambda r: r.hset("consumer:ids", "a", "b"), "consumer:ids", "hash", "CONSUMERS_LIST"),
        (lambda r: r.rpush("messages:dead", "x"), "messages:dead", "list", "DEAD_LETTER_STREAM"),
        (lambda r: r.rpush("processor:stats", "x"), "processor:stats", "list", "KEY_PREFIX"),
    ],
    ids=["output-string", "consumers-hash", "dead-list", "prefix-stats-list"],
)
def test_a_key_of_the_wrong_type_at_start_exits_2_naming_it(
    redis_url: str,
    r: redis.Redis,
    prepare: Callable[[redis.Redis], object],
    key: str,
    held: str,
    setting: str,
) -> None:
    prepare(r)
    done = _consume(redis_url)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert f"invalid {setting}: key '{key}' holds a {held}" in lines[-1], lines
    assert not r.keys("processor:heartbeat:*"), "a consumer started"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output-stream", "consumer:ids"], "invalid CONSUMERS_LIST: 'consumer:ids' is "),
        (["--dead-letter-stream", "consumer:ids"], "invalid CONSUMERS_LIST: 'consumer:ids' is "),
        (["--output-stream", "processor:out"], "invalid OUTPUT_STREAM: 'processor:out' is under"),
    ],
)
def test_two_settings_naming_one_key_are_refused(
    redis_url: str, flags: list[str], message: str
) -> None:
    done = _consume(redis_url, *flags)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


def _stop_lines(log: str) -> list[dict[str, int]]:
    return [
        {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", line)}
        for line in log.splitlines()
        if "consumer stopped:" in line
    ]


WRITES_REFUSED = (
    r"Redis \(writes\) refused: WRONGTYPE {key} holds a string .*retrying until that key is "
    r"deleted or renamed; holding \d+ messages"
)


@pytest.mark.parametrize(
    ("key", "refusal"),
    [
        ("messages:processed", WRITES_REFUSED),
        ("messages:dead", WRITES_REFUSED),
        # The heartbeats go on (no consumer is declared dead), and the consumers list
        # themselves again once it is deleted.
        (
            "consumer:ids",
            r"Redis \(heartbeat\) refused: WRONGTYPE consumer:ids holds a string where the "
            r"daemon keeps a list \(membership\.lua\): delete or rename that key",
        ),
        (
            "processor:departures",
            r"Redis \(group events\) refused: WRONGTYPE processor:departures holds a string "
            r"where the daemon keeps a stream \(the group's events\)",
        ),
    ],
)
def test_a_key_overwritten_while_running_is_waited_out_and_every_message_written_once(
    procs, redis_url: str, r: redis.Redis, tmp_path: Path, key: str, refusal: str
) -> None:
    """With the dead-letter stream overwritten, each batch's outputs could be appended before
    its dead letters fail: the write script checks the types first, so a retry never writes an
    output twice."""

    def overwrite() -> None:
        r.delete(key)
        r.set(key, "someone else's value")

    restore = lambda: r.delete(key)  # noqa: E731
    _waited_out(procs, redis_url, r, tmp_path, overwrite, restore, refusal.format(key=key))


def _seen_bucket(r: redis.Redis) -> str:
    """The dedup set the next writes go to: Redis's clock in bucket widths."""
    seconds, micros = r.time()
    width_ms = Window.for_ttl(int(FAST_SETTINGS["DEDUP_WINDOW_MS"])).width_ms
    return f"processor:seen:{(seconds * 1000 + micros // 1000) // width_ms}"


@pytest.mark.parametrize("target", ["counter", "counter-007", "seen-set"])
def test_a_counter_or_a_dedup_set_overwritten_while_running_is_waited_out_naming_it(
    procs, redis_url: str, r: redis.Redis, tmp_path: Path, target: str
) -> None:
    """A counter holding a word failed the write script's HINCRBY after its appends (the write
    thread died, 980 of 1,000 messages were missing and no counter said so); a dedup set of
    another type failed it with an error that named no key."""
    if target.startswith("counter"):
        key, field = "processor:stats", "written"
        # HINCRBY refuses a leading zero, which int() takes.
        value = "007" if target == "counter-007" else "abc"

        def overwrite() -> None:
            r.hset(key, field, value)

        def restore() -> None:
            r.hdel(key, field)

        refusal = rf"Redis \(writes\) refused: WRONGTYPE {key} field {field} holds {value} where"
    else:
        key = _seen_bucket(r)

        def overwrite() -> None:
            r.set(key, "someone else's value")

        def restore() -> None:
            r.delete(key)

        refusal = rf"Redis \(writes\) refused: WRONGTYPE {key} holds a string where"
    _waited_out(procs, redis_url, r, tmp_path, overwrite, restore, refusal)


def _waited_out(
    procs,
    redis_url: str,
    r: redis.Redis,
    tmp_path: Path,
    overwrite: Callable[[], object],
    restore: Callable[[], object],
    refusal: str,
) -> None:
    """Overwrites a key the daemon writes while it runs; every consumer logs ``refusal`` and
    holds what it receives; once the key is restored, everything is written once, with no
    consumer replaced or declared dead and nothing lost."""
    daemon = start_daemon(procs, redis_url, "partitioned", count=2)
    overwrite()
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 1.0, rate=300)
    for number in range(5):
        publish_invalid(r, f"while overwritten {number}")
    wait_until(
        lambda: re.search(refusal, daemon.log()),
        20,
        message="no consumer logged the refusal",
    )
    refused_at = time.monotonic()
    publisher.finish()
    wait_until(lambda: time.monotonic() - refused_at >= 4, 10)
    restore()

    expected = Expected(publisher.records())
    assert len(expected.to_write) >= 250, len(expected.to_write)
    bclient = client(redis_url)
    settled = settle(bclient, expected, timeout=30)
    summary = check_streams(bclient, expected, "overwritten")
    dead = bclient.xrange("messages:dead")
    bclient.close()
    assert settled, summary
    assert len(dead) == 5, dead
    log = daemon.log()
    assert "exited with code" not in log, log[-3000:]
    assert "thread died" not in log, log[-3000:]
    assert "declared us dead" not in log, log[-3000:]
    wait_until(lambda: len(daemon.listed()) == 2, 10, message="the consumers were not relisted")
    daemon.stop("overwritten")
    stops = _stop_lines(daemon.log())
    assert len(stops) == 2, stops
    assert all(stop["lost"] == 0 and stop["left_to_takeover"] == 0 for stop in stops), stops


@pytest.mark.parametrize("value", ["abc", "007", "-0", "", "+5", "1" * 19])
def test_a_counter_holding_no_integer_at_start_exits_2_naming_it(
    redis_url: str, r: redis.Redis, value: str
) -> None:
    """HINCRBY's rule, which the write script applies before its first write: Python's int()
    took "007" and "-0" (HINCRBY then failed after the appends) and "" as 0."""
    r.hset("processor:stats", "written", value)
    done = _consume(redis_url)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"invalid KEY_PREFIX: processor:stats field written holds {value!r}" in line, line
    assert not r.keys("processor:heartbeat:*"), "a consumer started"


def test_a_stop_that_outlasts_the_grace_logs_what_the_killed_consumers_held(
    procs, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A handler that hangs past SHUTDOWN_GRACE: the supervisor kills its consumer, says how
    many messages it held (from its last status) and counts them as lost in the group."""
    env = daemon_env(
        redis_url,
        "partitioned",
        1,
        {
            "HANDLER": "tests.handlers_for_tests:sleeps_forever",
            "HANDLER_TIMEOUT": "0",
            "SHUTDOWN_GRACE": "1",
        },
    )
    daemon = procs.start(["demo/consume.py"], env=env)
    wait_until(lambda: r.llen("consumer:ids") == 1, 20, message="consumer not listed")
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 0.5, rate=100)
    publisher.finish()
    wait_until(
        lambda: int(r.hget(f"processor:consumer:{r.lindex('consumer:ids', 0)}", "held")) > 0,
        10,
        message="the consumer never reported what it holds",
    )
    daemon.send_signal(15)
    assert daemon.wait(timeout=30) == 1
    log = procs.output(daemon)
    found = re.search(r"did not stop in time: killing it; it held (\d+) unwritten messages", log)
    assert found, log[-3000:]
    held = int(found.group(1))
    assert held > 0
    assert int(r.hget("processor:stats", "lost") or 0) == held


def test_a_stop_that_could_not_write_what_it_held_exits_1(
    procs, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """Writes refused (the output stream overwritten) when SIGTERM comes: the consumers stop
    within the grace, counting what they held as lost. The daemon exited 0 all the same, which
    the exit-code table calls "every consumer flushed" and Restart=on-failure takes as clean."""
    env = daemon_env(redis_url, "partitioned", 2, {})
    daemon = procs.start(["demo/consume.py"], env=env)
    wait_until(lambda: r.llen("consumer:ids") == 2, 20, message="consumers not listed")
    r.set("messages:processed", "someone else's value")
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 0.5, rate=100)
    publisher.finish()
    wait_until(
        lambda: "Redis (writes) refused: WRONGTYPE" in procs.output(daemon),
        20,
        message="no consumer logged the refusal",
    )
    daemon.send_signal(15)
    assert daemon.wait(timeout=30) == 1, procs.output(daemon)[-3000:]
    stops = _stop_lines(procs.output(daemon))
    assert len(stops) == 2, stops
    assert sum(stop["lost"] for stop in stops) >= 50, stops
    assert "did not stop in time" not in procs.output(daemon)
