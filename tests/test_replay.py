"""``processor replay`` against a real redis-server: the script on its own (forget, publish,
delete; twice; two dead letters of one id; nobody subscribed), the command's refusals, and end
to end with a daemon whose handler fails for some messages until it is fixed."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.cluster import RedisCluster

from demo.redis_cluster import LocalCluster
from processor.commands.deadletters import by_reason, select
from processor.commands.replay import ACL_RULES as REPLAY_ACL_RULES
from processor.commands.replay import (
    GONE,
    NOT_RECEIVED,
    NOT_REPLAYABLE,
    REPLAYED,
    Replayer,
    live_consumers,
)
from processor.config import GroupSettings
from processor.consumer.dedup import SeenCheck, Window
from processor.consumer.messages import OUTPUT, Entry, Message, handler_failed, parse
from processor.consumer.writer import Writer, WriteResult
from processor.store.access import ACL_RULES as DAEMON_ACL_RULES
from processor.store.connection import command_client
from processor.store.keys import Keys
from tests.conftest import Processes
from tests.faults_support import start_daemon
from tests.handlers_for_tests import FIXED_FILE_ENV
from tests.helpers import list_live_consumer, processor_cli, tagged, wait_until

CONSUMER = "consumer-replay"
WINDOW_MS = 60_000
WAIT_S = 30.0


@pytest.fixture
def writer(client: redis.Redis, keys: Keys) -> Writer:
    return Writer(client, keys, WINDOW_MS, 0.2, tagged("[test]"), threading.Event(), 1.0)


def _raw(message_id: str) -> bytes:
    return json.dumps({"message_id": message_id}).encode()


def _failure(message_id: str) -> Entry:
    message = parse(_raw(message_id), 1024)
    assert isinstance(message, Message)
    return handler_failed(message, "handler raised RuntimeError: not fixed", 1024)


def _output(message_id: str) -> Entry:
    return Entry(OUTPUT, message_id, _raw(message_id))


def _seen(client: redis.Redis, keys: Keys, message_id: str) -> bool:
    return SeenCheck(client, keys, Window.for_ttl(WINDOW_MS)).seen([message_id])[0]


def _received(pubsub: redis.client.PubSub) -> bytes:
    """The next payload published to the channel (the subscribe confirmation passed over)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message is not None:
            payload: bytes = message["data"]
            return payload
    raise AssertionError("the replay reached no subscriber")


def _nothing_else_published(client: redis.Redis, keys: Keys, pubsub: redis.client.PubSub) -> None:
    """A sentinel published now is the next payload the subscriber gets."""
    client.publish(keys.channel, b"sentinel")
    assert _received(pubsub) == b"sentinel"


def test_a_replay_forgets_the_id_publishes_and_deletes_the_entry_once(
    client: redis.Redis, keys: Keys, writer: Writer, subscriber: Any
) -> None:
    assert writer.write([_failure("m-1")], CONSUMER, "") == WriteResult(0, 1, 0, dead_flags="1")
    assert _seen(client, keys, "m-1")  # remembered: a plain re-publish would be skipped
    (letter,) = select(client, keys, by_reason(None))
    outcome = Replayer(client, keys).replay(letter)
    assert (outcome.outcome, outcome.receivers, outcome.forgotten) == (REPLAYED, 1, True)
    assert outcome.message_id == "m-1"
    assert _received(subscriber) == _raw("m-1")
    assert not _seen(client, keys, "m-1")
    assert client.xlen(keys.dead) == 0
    # The consumer writes it now; the same entry replayed again is gone, and forgets nothing.
    assert writer.write([_output("m-1")], CONSUMER, "").written == 1  # type: ignore[union-attr]
    again = Replayer(client, keys).replay(letter)
    assert (again.outcome, again.receivers) == (GONE, 0)
    assert _seen(client, keys, "m-1")
    _nothing_else_published(client, keys, subscriber)


def test_two_dead_letters_of_one_id_are_written_once(
    client: redis.Redis, keys: Keys, writer: Writer, subscriber: Any
) -> None:
    writer.write([_failure("m-2")], CONSUMER, "")
    (first,) = select(client, keys, by_reason(None))
    # The same message dead-lettered again once the window had forgotten it: a second entry.
    client.xadd(keys.dead, {"reason_code": "handler_error", "raw": _raw("m-2")})
    second, _ = select(client, keys, by_reason(None))
    replayer = Replayer(client, keys)
    assert replayer.replay(first).forgotten
    writer.write([_output("m-2")], CONSUMER, "")  # the replay, written
    # The second entry is older than that forget: published as it is, the write skips it.
    later = replayer.replay(second)
    assert (later.outcome, later.forgotten) == (REPLAYED, False)
    assert writer.write([_output("m-2")], CONSUMER, "") == WriteResult(0, 0, 1)
    assert [_received(subscriber) for _ in range(2)] == [_raw("m-2")] * 2
    assert client.xlen(keys.output) == 1
    assert client.xlen(keys.dead) == 0


def test_a_replay_that_fails_again_is_dead_lettered_again_and_replayed_again(
    client: redis.Redis, keys: Keys, writer: Writer, subscriber: Any
) -> None:
    writer.write([_failure("m-3")], CONSUMER, "")
    replayer = Replayer(client, keys)
    (letter,) = select(client, keys, by_reason(None))
    assert replayer.replay(letter).outcome == REPLAYED
    # The handler is not fixed yet: the replay is dead-lettered again, a new entry.
    assert writer.write([_failure("m-3")], CONSUMER, "") == WriteResult(0, 1, 0, dead_flags="1")
    (again,) = select(client, keys, by_reason(None))
    assert again.entry_id != letter.entry_id
    outcome = replayer.replay(again)  # appended after the forget: forgotten again
    assert (outcome.outcome, outcome.forgotten) == (REPLAYED, True)
    assert writer.write([_output("m-3")], CONSUMER, "").written == 1  # type: ignore[union-attr]


def test_a_replay_nobody_received_keeps_the_entry(
    client: redis.Redis, keys: Keys, writer: Writer
) -> None:
    writer.write([_failure("m-4")], CONSUMER, "")
    (letter,) = select(client, keys, by_reason(None))
    replayer = Replayer(client, keys)
    outcome = replayer.replay(letter)
    assert (outcome.outcome, outcome.receivers, outcome.forgotten) == (NOT_RECEIVED, 0, True)
    assert client.xlen(keys.dead) == 1
    # Replayed again later: the id was forgotten already, so nothing is forgotten twice.
    assert replayer.replay(letter).forgotten is False


def test_what_failed_validation_is_not_replayed(
    client: redis.Redis, keys: Keys, writer: Writer, subscriber: Any
) -> None:
    writer.write([parse(b"not json", 1024), parse(b'{"no": "id"}', 1024)], CONSUMER, "")  # type: ignore[list-item]
    replayer = Replayer(client, keys)
    outcomes = [replayer.replay(letter) for letter in select(client, keys, by_reason(None))]
    assert [outcome.outcome for outcome in outcomes] == [NOT_REPLAYABLE] * 2
    assert client.xlen(keys.dead) == 2
    _nothing_else_published(client, keys, subscriber)


def _replay(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return processor_cli("replay", "--redis-url", redis_url, *args)


def test_replay_is_refused_without_a_live_consumer(
    redis_url: str, client: redis.Redis, keys: Keys, writer: Writer, subscriber: Any
) -> None:
    writer.write([_failure("m-5")], CONSUMER, "")
    # A subscriber is not a consumer: the group lists none.
    result = _replay(redis_url, "--all")
    assert result.returncode == 6
    assert "no live consumer" in result.stderr
    assert client.xlen(keys.dead) == 1
    assert _seen(client, keys, "m-5")


@pytest.fixture
def acl_users(r: redis.Redis) -> Iterator[None]:
    try:
        yield
    finally:
        r.execute_command("ACL", "DELUSER", "replayer", "narrow")


def test_the_documented_acl_lets_a_user_replay_and_a_narrower_one_gets_one_line(
    redis_url: str, r: redis.Redis, keys: Keys, writer: Writer, subscriber: Any, acl_users: None
) -> None:
    writer.write([_failure("m-6")], CONSUMER, "")
    list_live_consumer(r, keys)
    rules = [*DAEMON_ACL_RULES.split(), *REPLAY_ACL_RULES.split()]
    r.execute_command("ACL", "SETUSER", "replayer", "on", ">r-pass", *rules)
    r.execute_command("ACL", "SETUSER", "narrow", "on", ">n-pass", *DAEMON_ACL_RULES.split())
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    narrow = _replay(f"redis://narrow:n-pass@127.0.0.1:{port}/0", "--all")
    assert narrow.returncode == 1
    (line,) = narrow.stderr.splitlines()
    assert "Redis refused the command" in line and "no permissions" in line, line
    assert line.endswith(f"(replay needs, beyond the daemon's permissions: {REPLAY_ACL_RULES})")
    assert "n-pass" not in line
    allowed = _replay(f"redis://replayer:r-pass@127.0.0.1:{port}/0", "--all")
    assert allowed.returncode == 0, allowed.stderr
    assert "m-6  handler_error: replayed, received by 1 subscribers" in allowed.stdout
    assert _received(subscriber) == _raw("m-6")


def test_replay_needs_a_choice_and_reports_an_unreachable_redis(redis_url: str) -> None:
    missing = _replay(redis_url)
    assert missing.returncode == 2
    assert "one of the arguments --id --message-id --reason --all is required" in missing.stderr
    bad_id = _replay(redis_url, "--id", "yesterday")
    assert bad_id.returncode == 2 and "is not a stream entry id" in bad_id.stderr
    unreachable = _replay("redis://127.0.0.1:1/0", "--all")
    assert unreachable.returncode == 1
    (line,) = unreachable.stderr.splitlines()
    assert "processor replay: error: cannot replay from redis://127.0.0.1:1/0" in line


def _publish(client: redis.Redis, channel: str, count: int) -> None:
    for n in range(count):
        body = {"message_id": f"e2e-{n}", "n": n}
        assert client.publish(channel, json.dumps(body)) == 2  # both consumers


def _outputs(client: redis.Redis, keys: Keys) -> Counter[str]:
    return Counter(fields[b"message_id"].decode() for _, fields in client.xrange(keys.output))


def test_failed_messages_replayed_after_the_fix_are_each_written_exactly_once(
    procs: Processes, redis_url: str, client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    start_daemon(
        procs,
        redis_url,
        "partitioned",
        count=2,
        HANDLER="tests.handlers_for_tests:fails_odd_until_fixed",
        **{FIXED_FILE_ENV: str(fixed)},
    )
    assert client.publish(keys.channel, b"not json") == 2
    _publish(client, keys.channel, 20)
    wait_until(lambda: client.xlen(keys.output) == 10 and client.xlen(keys.dead) == 11, WAIT_S)
    odd = {f"e2e-{n}" for n in range(1, 20, 2)}
    args = ("dead-letters", "--json", "--reason", "handler_error")
    listed = json.loads(_run_cli(redis_url, *args).stdout)
    assert {item["message_id"] for item in listed} == odd

    # Replayed before the fix: dead-lettered again, as a new entry with the same message_id.
    first = listed[-1]
    result = _replay(redis_url, "--message-id", first["message_id"], "--json")
    assert result.returncode == 0, result.stderr
    (outcome,) = json.loads(result.stdout)
    assert (outcome["outcome"], outcome["receivers"]) == (REPLAYED, 2)

    def dead_lettered_again() -> bool:
        ids = {
            (letter.message_id, letter.entry_id) for letter in select(client, keys, by_reason(None))
        }
        return any(m == first["message_id"] and e != first["entry_id"] for m, e in ids)

    wait_until(dead_lettered_again, WAIT_S)
    assert client.xlen(keys.dead) == 11

    fixed.touch()
    result = _replay(redis_url, "--reason", "handler_error")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "10 of 10 dead letters replayed"
    assert all("received by 2 subscribers" in line for line in result.stdout.splitlines()[:-1])
    wait_until(lambda: client.xlen(keys.output) == 20, WAIT_S)
    # Only what failed validation is left: --all passes over it (named, it would be an error).
    (junk,) = select(client, keys, by_reason(None))
    assert junk.reason_code == "invalid_json"
    again = _replay(redis_url, "--all")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"{junk.entry_id}  -  invalid_json: not replayed: it would fail validation again",
        "0 of 1 dead letters replayed",
    ]
    assert _replay(redis_url, "--id", junk.entry_id).returncode == 6
    # A re-publish of every message is skipped as written.
    skipped = int(client.hget(keys.stats, "skipped") or 0)
    _publish(client, keys.channel, 20)
    wait_until(lambda: int(client.hget(keys.stats, "skipped") or 0) >= skipped + 20, WAIT_S)
    outputs = _outputs(client, keys)
    assert outputs == Counter({f"e2e-{n}": 1 for n in range(20)})


def _run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = processor_cli(*args, "--redis-url", redis_url)
    assert result.returncode == 0, result.stderr
    return result


def test_on_a_cluster_each_partition_replays_to_its_own_shard_channel(
    module_cluster: LocalCluster,
) -> None:
    settings = GroupSettings(redis_url=module_cluster.url, redis_cluster=True, partitions=3)
    keys = Keys.from_settings(settings)
    cluster = command_client(settings, name="test-replay-cluster")
    subscribers = []
    try:
        writer = Writer(cluster, keys, WINDOW_MS, 0.2, tagged("[test]"), threading.Event(), 1.0)
        ids = [f"c-{n}" for n in range(9)]
        assert writer.write([_failure(item) for item in ids], CONSUMER, "").dead == 9  # type: ignore[union-attr]
        assert {keys.partition_of(item) for item in ids} == {0, 1, 2}
        for part in keys.partitions:
            node = cast(RedisCluster, cluster).get_node_from_key(part.channel)
            pubsub = redis.Redis(host=node.host, port=node.port).pubsub(
                ignore_subscribe_messages=True
            )
            pubsub.ssubscribe(part.channel)
            subscribers.append(pubsub)
        letters = select(cluster, keys, by_reason(None))
        assert sorted(letter.message_id for letter in letters) == ids
        replayer = Replayer(cluster, keys)
        for letter in letters:
            outcome = replayer.replay(letter)
            assert (outcome.outcome, outcome.receivers, outcome.forgotten) == (REPLAYED, 1, True)
            assert _received(subscribers[letter.partition]) == _raw(letter.message_id)
        assert not any(SeenCheck(cluster, keys, Window.for_ttl(WINDOW_MS)).seen(ids))
        assert select(cluster, keys, by_reason(None)) == []
        # The command's check of live consumers reads the group's keys on their one slot.
        assert live_consumers(cluster, keys) == 0
        cluster.rpush(keys.consumers, "alive", "gone")
        cluster.set(keys.heartbeat("alive"), "token", px=60_000)
        assert live_consumers(cluster, keys) == 1
    finally:
        for pubsub in subscribers:
            pubsub.close()
        cluster.close()
