"""A key of the wrong type under the one-shot commands, against a real redis-server: ``replay``
and ``dead-letters`` say which key holds what, in the daemon's start-up words, and exit 2 (a
wrong setting or key, not an unreachable Redis); ``status`` names every such key and shows the
rest of the group."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis

from processor.errors import ExitCode
from processor.store.keys import Keys
from tests.helpers import list_live_consumer, processor_cli

_FIX = "delete or rename that key, or set {setting} to another name"


def _dead_letter(client: redis.Redis, keys: Keys) -> None:
    raw = json.dumps({"message_id": "m-1"})
    client.xadd(keys.dead, {"message_id": "m-1", "reason_code": "handler_error", "raw": raw})


@pytest.mark.parametrize(
    ("prepare", "held"),
    [
        (lambda client, key: client.set(key, "x"), "string"),
        (lambda client, key: client.rpush(key, "x"), "list"),
    ],
    ids=["string", "list"],
)
@pytest.mark.parametrize("command", [("dead-letters",), ("replay", "--all")])
def test_a_dead_letter_stream_of_another_type_is_named_with_exit_code_2(
    redis_url: str,
    client: redis.Redis,
    keys: Keys,
    prepare: Callable[[redis.Redis, str], object],
    held: str,
    command: tuple[str, ...],
) -> None:
    list_live_consumer(client, keys)
    prepare(client, keys.dead)
    result = processor_cli(*command, "--redis-url", redis_url)
    assert result.returncode == ExitCode.CONFIG == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.endswith(
        f"{command[0]}: error: invalid DEAD_LETTER_STREAM: key 'messages:dead' holds a {held} "
        f"where the daemon writes a stream; {_FIX.format(setting='DEAD_LETTER_STREAM')}"
    ), line
    assert result.stdout == ""


@pytest.mark.parametrize("server", ["redis_server", "redis62"])
def test_a_replay_record_of_another_type_is_named_and_nothing_is_replayed(
    server: str, request: pytest.FixtureRequest, keys: Keys
) -> None:
    """Refused inside the replay script: Redis 7 replies WRONGTYPE, Redis 6.2 wraps it in the
    script's error; neither names the key."""
    redis_url = request.getfixturevalue(server).url
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    list_live_consumer(client, keys)
    _dead_letter(client, keys)
    client.set(keys.single.replayed, "oops")
    result = processor_cli("replay", "--all", "--redis-url", redis_url)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.endswith(
        "replay: error: invalid KEY_PREFIX: key 'processor:replayed' holds a string where "
        f"processor replay writes a hash; {_FIX.format(setting='KEY_PREFIX')}"
    ), line
    assert result.stdout == ""
    assert client.xlen(keys.dead) == 1
    client.close()


def test_status_names_every_key_of_another_type_and_shows_the_rest(
    redis_url: str, client: redis.Redis, keys: Keys
) -> None:
    list_live_consumer(client, keys)
    client.xadd(keys.output, {"message_id": "m-0"})
    client.set(keys.dead, "x")
    client.rpush(keys.stats, "x")
    result = processor_cli("status", "--redis-url", redis_url)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert (
        "WRONG TYPE: invalid DEAD_LETTER_STREAM: key 'messages:dead' holds a string where the "
        f"daemon writes a stream; {_FIX.format(setting='DEAD_LETTER_STREAM')}"
    ) in lines
    assert (
        "WRONG TYPE: invalid KEY_PREFIX: key 'processor:stats' holds a list where the daemon "
        f"writes a hash; {_FIX.format(setting='KEY_PREFIX')}"
    ) in lines
    assert any(line.startswith("group: 1 live consumers") for line in lines)
    assert "streams: messages:processed 1" in lines
    assert any(line.startswith("live-1 ") for line in lines)
    document = json.loads(processor_cli("status", "--json", "--redis-url", redis_url).stdout)
    assert [problem.split(":")[0] for problem in document["wrong_types"]] == [
        "invalid KEY_PREFIX",
        "invalid DEAD_LETTER_STREAM",
    ]
    assert [consumer["consumer_id"] for consumer in document["consumers"]] == ["live-1"]


def test_status_names_a_counter_that_holds_no_integer(
    redis_url: str, client: redis.Redis, keys: Keys
) -> None:
    list_live_consumer(client, keys)
    client.hset(keys.stats, mapping={"written": "abc", "dead": "3"})
    result = processor_cli("status", "--redis-url", redis_url)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        f"WRONG TYPE: invalid KEY_PREFIX: {keys.stats} field written holds 'abc' where the "
        "daemon counts an integer: delete that field"
    ) in result.stdout.splitlines()
    assert any(line.startswith("live-1 ") for line in result.stdout.splitlines())
