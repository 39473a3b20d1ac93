"""End to end: demo/consume.py and demo/publish.py as real processes against a real redis-server.

What was published comes from the publisher's ``--record`` file (one line per PUBLISH with the
number of subscribers that received it); what was written is read back from the streams.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from demo.redis_server import RedisServer
from processor.config import Settings
from processor.store.keys import Keys
from tests.conftest import REPO_ROOT, LoggedProcess, Processes
from tests.helpers import wait_until
from tests.servers import Server

pytestmark = pytest.mark.e2e

CONSUME = "demo/consume.py"
PUBLISH = "demo/publish.py"
WAIT_S = 30.0
EXIT_WITHIN_S = 15.0
FAST = {
    "HEARTBEAT_INTERVAL_MS": "200",
    "HEARTBEAT_TTL_MS": "1000",
    "TAKEOVER_BUFFER_MS": "3000",
    "DEDUP_WINDOW_MS": "60000",
    "MONITORING_INTERVAL": "1",
}
CHANNEL = "messages:published"
OUTPUT = "messages:processed"
DEAD = "messages:dead"
CONSUMERS = "consumer:ids"
STATS = "processor:stats"
PUBLISHED_FIELDS = {"message_id", "published_at", "source", "text"}
READY = re.compile(r"\[(\S+) pid=\d+\] consumer ready")


# -- helpers ----------------------------------------------------------------------------------


def start_daemon(
    procs: Processes,
    redis_url: str,
    count: int,
    args: list[str] | None = None,
    consumers_list: str = CONSUMERS,
    **env: str,
) -> tuple[LoggedProcess, set[str]]:
    """Starts consume.py and waits until ``count`` consumers are listed; returns their ids.

    CONSUMERS_COUNT is set to ``count`` unless ``env`` sets it ("" leaves it unset).
    """
    full_env = {"REDIS_URL": redis_url, "CONSUMERS_COUNT": str(count), **FAST, **env}
    if full_env["CONSUMERS_COUNT"] == "":
        del full_env["CONSUMERS_COUNT"]
    daemon = procs.start([CONSUME, *(args or [])], env=full_env)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:

        def listed() -> bool:
            assert daemon.poll() is None, f"daemon exited early:\n{procs.output(daemon)}"
            return client.llen(consumers_list) == count

        wait_until(listed, WAIT_S, message=f"{count} consumers not listed in time")
        ids = set(client.lrange(consumers_list, 0, -1))
    finally:
        client.close()
    assert len(ids) == count
    return daemon, ids


def ready_ids(procs: Processes, daemon: LoggedProcess) -> set[str]:
    """The consumer ids the daemon's log says became ready."""
    return set(READY.findall(procs.output(daemon)))


def assert_no_consumer_died(procs: Processes, daemon: LoggedProcess) -> None:
    assert daemon.poll() is None, procs.output(daemon)
    # The supervisor logs every consumer it has to replace.
    assert "exited with code" not in procs.output(daemon), procs.output(daemon)


def stop_daemon(daemon: LoggedProcess) -> float:
    """SIGTERM to the supervisor only (it forwards to its consumers); asserts exit 0 in time."""
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(timeout=EXIT_WITHIN_S)
    assert code == 0, daemon.log_path.read_text(errors="replace")[-4000:]
    return time.monotonic() - started


def start_publisher(procs: Processes, redis_url: str, record: Path, *args: str) -> LoggedProcess:
    return procs.start([PUBLISH, "--record", str(record), *args], env={"REDIS_URL": redis_url})


def recorded(record: Path) -> list[tuple[str, int]]:
    """(message_id, receivers) per complete line of the record file."""
    text = record.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [(line.split()[0], int(line.split()[1])) for line in complete.splitlines()]


def written_ids(r: redis.Redis, stream: str = OUTPUT) -> list[str]:
    return [fields["message_id"] for _, fields in r.xrange(stream)]


def assert_exactly_once(r: redis.Redis, expected: set[str], stream: str = OUTPUT) -> None:
    ids = written_ids(r, stream)
    duplicated = [message_id for message_id, n in Counter(ids).items() if n > 1]
    assert not duplicated, f"{len(duplicated)} ids written more than once: {duplicated[:5]}"
    missing = expected - set(ids)
    assert not missing, f"{len(missing)} ids never written: {sorted(missing)[:5]}"
    extra = set(ids) - expected
    assert not extra, f"{len(extra)} ids written that were never published: {sorted(extra)[:5]}"


def raw_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["partitioned", "race"])
def test_three_consumers_write_every_message_exactly_once(procs, redis_url, r, tmp_path, strategy):
    publish_and_compare(procs, redis_url, r, tmp_path, strategy)


def test_every_server_of_the_matrix_gets_every_message_exactly_once(
    procs, matrix_server: tuple[Server, RedisServer], tmp_path
):
    """The comparison above on Redis 6.2, Redis 7.0 and Valkey (tests/servers.py); the daemon
    names the server it found."""
    spec, server = matrix_server
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        log = publish_and_compare(procs, server.url, client, tmp_path, "partitioned", seconds=2.5)
    finally:
        client.close()
    assert f"Redis at {server.url} is {spec.name} {spec.version}." in log, log[-3000:]


def publish_and_compare(
    procs: Processes,
    redis_url: str,
    r: redis.Redis,
    tmp_path: Path,
    strategy: str,
    seconds: float = 5.0,
) -> str:
    """Three consumers while the publisher runs for ``seconds``: every message it recorded is
    written once, with the fields the daemon writes; returns the daemon's log."""
    daemon, ids = start_daemon(procs, redis_url, 3, STRATEGY=strategy)
    record = tmp_path / "published.txt"
    publisher = start_publisher(
        procs, redis_url, record, "--target-duration-s", str(seconds), "--pause-min-ms", "20",
        "--pause-max-ms", "200",
    )  # fmt: skip
    seen = set(ids)

    def publisher_done() -> bool:
        seen.update(r.lrange(CONSUMERS, 0, -1))
        return publisher.poll() is not None

    wait_until(publisher_done, WAIT_S, message="publisher did not finish")
    assert publisher.returncode == 0, procs.output(publisher)
    published = recorded(record)
    assert published, "the publisher recorded nothing"
    # Partitioned: two readers subscribe and feed the third; race: every consumer subscribes.
    subscribers = 2 if strategy == "partitioned" else 3
    assert all(n == subscribers for _, n in published), "a PUBLISH missed a subscriber"
    expected = {message_id for message_id, _ in published}
    assert len(expected) == len(published)

    def all_written() -> bool:
        seen.update(r.lrange(CONSUMERS, 0, -1))
        return r.xlen(OUTPUT) >= len(expected)

    wait_until(all_written, WAIT_S, message="output incomplete")
    assert_no_consumer_died(procs, daemon)
    stop_daemon(daemon)

    assert_exactly_once(r, expected)
    for _, fields in r.xrange(OUTPUT):
        assert set(fields) == {"message_id", "consumer_id", "data"}
        assert fields["consumer_id"] in seen
        data = json.loads(fields["data"])
        assert isinstance(data, dict)
        assert data["message_id"] == fields["message_id"]
        assert data["source"] == "publish.py"
        assert set(data) > PUBLISHED_FIELDS
        assert len(set(data) - PUBLISHED_FIELDS) == 1, f"not one added property: {data}"
    assert int(r.hget(STATS, "written")) == r.xlen(OUTPUT) == len(expected)
    assert r.xlen(DEAD) == 0
    return procs.output(daemon)


def test_invalid_messages_are_dead_lettered_once_and_the_daemon_carries_on(procs, redis_url, r):
    limit = 1024
    daemon, ids = start_daemon(procs, redis_url, 2, MAX_MESSAGE_BYTES=str(limit))
    oversized = json.dumps({"message_id": "big", "pad": "x" * 2000}).encode()
    invalid = {
        b"this is not JSON {": "invalid JSON",
        b"[1, 2, 3]": "not a JSON object: list",
        b'{"text": "no id"}': "missing message_id",
        b'{"message_id": ""}': "empty message_id",
        b'{"message_id": 42}': "message_id is not a string: int",
        b'\xff\xfe{"message_id": "bad-utf8"}': "invalid UTF-8",
        oversized: f"oversized: {len(oversized)} bytes > limit {limit}",
    }
    for payload in invalid:
        assert r.publish(CHANNEL, payload) == 2
    valid = {f"valid-{n}" for n in range(20)}
    for message_id in sorted(valid):
        assert r.publish(CHANNEL, json.dumps({"message_id": message_id, "text": "ok"})) == 2

    wait_until(lambda: r.xlen(DEAD) >= len(invalid), WAIT_S, message="dead letters missing")
    wait_until(lambda: r.xlen(OUTPUT) >= len(valid), WAIT_S, message="valid messages missing")
    assert_no_consumer_died(procs, daemon)
    assert r.llen(CONSUMERS) == 2
    stop_daemon(daemon)

    client = raw_client(redis_url)
    try:
        dead = [fields for _, fields in client.xrange(DEAD)]
    finally:
        client.close()
    assert len(dead) == len(invalid)
    by_raw = {fields[b"raw"]: fields for fields in dead}
    for payload, reason in invalid.items():
        fields = by_raw.get(payload[:limit])
        assert fields is not None, f"no dead letter for {payload[:40]!r}"
        required = {b"reason", b"reason_code", b"raw", b"consumer_id", b"time"}
        assert required <= set(fields) <= required | {b"message_id"}, set(fields)
        assert reason in fields[b"reason"].decode(), fields[b"reason"]
        assert fields[b"consumer_id"].decode() in ids
    assert len(by_raw[oversized[:limit]][b"raw"]) == limit
    assert_exactly_once(r, valid)
    assert int(r.hget(STATS, "dead")) == len(invalid)


def test_consumers_list_holds_the_live_consumers_and_is_emptied_on_sigterm(procs, redis_url, r):
    # A line per report though idle: the lines count the reports.
    daemon, ids = start_daemon(procs, redis_url, 2, MONITORING_IDLE_INTERVAL="1")
    wait_until(lambda: len(ready_ids(procs, daemon)) == 2, WAIT_S, message="no ready lines")
    assert ids == ready_ids(procs, daemon)
    for consumer_id in ids:
        assert r.pttl(f"processor:heartbeat:{consumer_id}") > 0
    # Still exactly these two after the monitor has pruned the list a few times (each
    # throughput line reads the group through the pruning script).
    wait_until(
        lambda: procs.output(daemon).count("throughput group 2 consumers") >= 3,
        WAIT_S,
        message="no monitor lines",
    )
    assert sorted(r.lrange(CONSUMERS, 0, -1)) == sorted(ids)

    elapsed = stop_daemon(daemon)

    assert elapsed < EXIT_WITHIN_S
    assert r.llen(CONSUMERS) == 0
    assert not r.exists(*(f"processor:heartbeat:{consumer_id}" for consumer_id in ids))


def test_sigterm_while_publishing_loses_nothing_received_before_it(procs, redis_url, r, tmp_path):
    daemon, ids = start_daemon(procs, redis_url, 2)
    record = tmp_path / "published.txt"
    publisher = start_publisher(
        procs, redis_url, record, "--rate", "5000", "--target-duration-s", "3"
    )
    wait_until(
        lambda: record.exists() and len(recorded(record)) >= 5000,
        WAIT_S,
        message="publisher too slow",
    )
    # Every line here is a PUBLISH whose reply came back before the signal was sent, so the
    # message sat in a consumer's subscription before that consumer could unsubscribe.
    before = recorded(record)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=EXIT_WITHIN_S) == 0, procs.output(daemon)
    assert publisher.wait(timeout=WAIT_S) == 0, procs.output(publisher)

    received_before = {message_id for message_id, receivers in before if receivers >= 1}
    assert len(received_before) == len(before), "a PUBLISH before the signal reached nobody"
    ids_written = written_ids(r)
    assert len(ids_written) == len(set(ids_written)), "duplicates after SIGTERM"
    assert {fields["consumer_id"] for _, fields in r.xrange(OUTPUT)} <= ids
    missing = received_before - set(ids_written)
    assert not missing, f"{len(missing)} of {len(received_before)} received messages lost"
    all_published = {message_id for message_id, _ in recorded(record)}
    assert set(ids_written) <= all_published
    assert r.llen(CONSUMERS) == 0


def test_sigterm_with_a_backlog_writes_everything_received_before_it(procs, redis_url, r):
    # A 10 ms handler: each consumer holds most of the burst, unprocessed, when the signal lands.
    daemon, ids = start_daemon(
        procs,
        redis_url,
        2,
        args=["--handler", "tests.handlers_for_tests:slow_10ms"],
        STRATEGY="race",
        SHUTDOWN_GRACE="30",
    )
    expected = {f"backlog-{n}" for n in range(200)}
    with r.pipeline(transaction=False) as pipe:
        for message_id in sorted(expected):
            pipe.publish(CHANNEL, json.dumps({"message_id": message_id}))
        assert pipe.execute() == [2] * len(expected)
    assert r.xlen(OUTPUT) < len(expected), "no backlog: the test proves nothing"

    stop_daemon(daemon)

    assert_exactly_once(r, expected)
    assert {fields["consumer_id"] for _, fields in r.xrange(OUTPUT)} <= ids
    assert r.llen(CONSUMERS) == 0


def test_a_stop_past_the_grace_counts_what_it_could_not_write_as_lost(procs, redis_url, r):
    """SHUTDOWN_GRACE shorter than the work held: the consumer is killed, and every message it
    received and did not write is in the group's lost counter (none hidden by its flush)."""
    daemon, _ = start_daemon(
        procs,
        redis_url,
        1,
        args=["--handler", "tests.handlers_for_tests:slow_10ms"],
        # Past the first batch (a second) and a few heartbeats into its flush.
        SHUTDOWN_GRACE="2.5",
    )
    expected = {f"held-{n}" for n in range(500)}  # 5 s of work
    with r.pipeline(transaction=False) as pipe:
        for message_id in sorted(expected):
            pipe.publish(CHANNEL, json.dumps({"message_id": message_id}))
        assert pipe.execute() == [1] * len(expected)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=EXIT_WITHIN_S) == 1  # the consumer was killed: not a clean stop
    ids = written_ids(r)
    assert len(ids) == len(set(ids)), "written twice"
    missing = expected - set(ids)
    lost = int(r.hget(Keys.from_settings(Settings()).partitions[0].stats, "lost") or 0)
    assert len(missing) >= 100, "written within the grace: the test proves nothing"
    assert lost >= len(missing), f"{len(missing)} not written, {lost} counted as lost"


def test_ctrl_c_to_the_whole_process_group_stops_gracefully(procs, redis_url, r):
    # A terminal's Ctrl-C (and systemd's default KillMode) signals every process of the group:
    # each consumer gets the signal itself as well as the one its supervisor forwards.
    daemon, ids = start_daemon(procs, redis_url, 2)
    messages = {f"ctrl-c-{n}" for n in range(50)}
    for message_id in sorted(messages):
        assert r.publish(CHANNEL, json.dumps({"message_id": message_id})) == 2

    os.killpg(daemon.pid, signal.SIGINT)

    assert daemon.wait(timeout=EXIT_WITHIN_S) == 0, procs.output(daemon)
    stopped = procs.output(daemon).count("consumer stopped")
    assert stopped == 2, f"{2 - stopped} consumers did not stop gracefully"
    assert r.llen(CONSUMERS) == 0
    assert not r.exists(*(f"processor:heartbeat:{consumer_id}" for consumer_id in ids))
    assert_exactly_once(r, messages)


def test_handler_exception_dead_letters_the_message_and_the_daemon_carries_on(procs, redis_url, r):
    daemon, ids = start_daemon(
        procs, redis_url, 2, args=["--handler", "tests.handlers_for_tests:raises"]
    )
    payloads = {}
    for n in range(30):
        message_id = f"m-{n}"
        payloads[message_id] = json.dumps({"message_id": message_id, "text": f"boom {n}"})
        assert r.publish(CHANNEL, payloads[message_id]) == 2
    assert r.publish(CHANNEL, b"not json") == 2

    wait_until(lambda: r.xlen(DEAD) >= len(payloads) + 1, WAIT_S, message="dead letters missing")
    assert_no_consumer_died(procs, daemon)
    assert r.llen(CONSUMERS) == 2
    stop_daemon(daemon)

    dead = [fields for _, fields in r.xrange(DEAD)]
    assert len(dead) == len(payloads) + 1
    assert {fields["consumer_id"] for fields in dead} <= ids
    by_raw = {fields["raw"]: fields["reason"] for fields in dead}
    for payload in payloads.values():
        reason = by_raw[payload]
        assert "ValueError" in reason
        assert "boom" in reason
    assert "invalid JSON" in by_raw["not json"]
    assert r.xlen(OUTPUT) == 0
    assert int(r.hget(STATS, "dead")) == len(payloads) + 1


FAILURE_COUNT = re.compile(r"handler failed (\d+) times? in the last [\d.]+ s \(ValueError \d+\)")


def test_handler_failures_are_logged_once_with_a_traceback_then_counted(procs, redis_url, r):
    daemon, _ = start_daemon(
        procs, redis_url, 1, args=["--handler", "tests.handlers_for_tests:raises"]
    )
    failing = [f"fails-{n}" for n in range(30)]
    for message_id in failing:
        assert r.publish(CHANNEL, json.dumps({"message_id": message_id})) == 1
    # Deeper than the output can be written: dead-lettered on input, the handler never runs.
    deep = '{"message_id":"deep","x":' + "[" * 299 + "]" * 299 + "}"
    assert r.publish(CHANNEL, deep) == 1

    def counted() -> int:
        return sum(int(n) for n in FAILURE_COUNT.findall(procs.output(daemon)))

    wait_until(lambda: counted() >= len(failing), WAIT_S, message="no count line")
    assert_no_consumer_died(procs, daemon)
    stop_daemon(daemon)

    log = procs.output(daemon)
    assert counted() == len(failing), log
    assert log.count("Traceback (most recent call last)") == 1, log
    assert log.count("handler failed (ValueError) on message_id 'fails-0'") == 1, log
    assert "boom for fails-0" in log
    assert not any(f"boom for {message_id}" in log for message_id in failing[1:]), log
    reasons = {fields["raw"]: fields["reason"] for _, fields in r.xrange(DEAD)}
    assert len(reasons) == len(failing) + 1
    assert reasons[deep] == "nested deeper than 254 levels"


def test_toml_file_is_honoured_and_env_then_flags_override_it(procs, redis_url, r, tmp_path):
    config = tmp_path / "processor.toml"
    config.write_text(
        "consumers_count = 1\n"
        'output_stream = "custom:out"\n'
        'dead_letter_stream = "file:dead"\n'
        'consumers_list = "file:ids"\n'
    )
    daemon, ids = start_daemon(
        procs,
        redis_url,
        1,
        args=["--config", str(config), "--consumers-list", "flag:ids"],
        consumers_list="flag:ids",
        DEAD_LETTER_STREAM="env:dead",
        CONSUMERS_LIST="env:ids",
        CONSUMERS_COUNT="",
    )
    # Settings line: the file's count (default 2) and stream, env over file, flag over env.
    wait_until(lambda: "daemon starting" in procs.output(daemon), WAIT_S)
    start_line = procs.output(daemon).split("daemon starting", 1)[1].splitlines()[0]
    for setting in (
        "consumers_count=1 ",
        "output_stream=custom:out ",
        "dead_letter_stream=env:dead ",
        "consumers_list=flag:ids ",
    ):
        assert setting in start_line, start_line
    assert r.publish(CHANNEL, json.dumps({"message_id": "configured"})) == 1
    assert r.publish(CHANNEL, b"not json") == 1
    wait_until(lambda: r.xlen("custom:out") == 1, WAIT_S, message="nothing in custom:out")
    wait_until(lambda: r.xlen("env:dead") == 1, WAIT_S, message="nothing in env:dead")
    assert set(r.lrange("flag:ids", 0, -1)) == ids == ready_ids(procs, daemon)
    stop_daemon(daemon)

    assert written_ids(r, "custom:out") == ["configured"]
    assert not r.exists(OUTPUT, DEAD, "file:dead", "file:ids", "env:ids", CONSUMERS)
    assert r.llen("flag:ids") == 0


def test_a_handler_module_in_the_working_directory_needs_no_pythonpath(
    procs: Processes, redis_url: str, r: redis.Redis, tmp_path: Path
):
    """As with rq, arq and celery: the daemon started where the handler's module is finds it,
    in the supervisor's check and in every spawned consumer, without PYTHONPATH."""
    here = tmp_path / "handlers"
    here.mkdir()
    (here / "local_handler.py").write_text(
        "def tag(message):\n    message['handled_by'] = 'local_handler'\n    return message\n"
    )
    env = {"REDIS_URL": redis_url, "CONSUMERS_COUNT": "2", "HANDLER": "local_handler:tag", **FAST}
    daemon = procs.start(
        [str(REPO_ROOT / CONSUME)], env=env, cwd=here, unset=("PYTHONPATH", "PYTHONSAFEPATH")
    )

    def listed() -> bool:
        assert daemon.poll() is None, f"daemon exited early:\n{procs.output(daemon)}"
        return r.llen(CONSUMERS) == 2

    wait_until(listed, WAIT_S, message="consumers not listed in time")
    ids = {f"local-{n}" for n in range(20)}
    for message_id in sorted(ids):
        assert r.publish(CHANNEL, json.dumps({"message_id": message_id})) == 2
    wait_until(lambda: r.xlen(OUTPUT) >= len(ids), WAIT_S, message="not all written")
    assert_exactly_once(r, ids)
    for _, fields in r.xrange(OUTPUT):
        assert json.loads(fields["data"])["handled_by"] == "local_handler", fields
    assert r.xlen(DEAD) == 0
    stop_daemon(daemon)
