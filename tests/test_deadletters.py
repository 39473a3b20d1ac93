"""``processor dead-letters`` against a real redis-server: newest first, a limit, a reason
filter, text and JSON, entries from before the fields existed, and a Redis it cannot reach."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
import redis

from processor.commands import deadletters
from processor.commands.deadletters import by_reason, render, select
from processor.consumer.messages import REASON_CODES, Message, handler_failed, parse
from processor.consumer.writer import Writer
from processor.store.keys import Keys
from tests.helpers import processor_cli, tagged

CONSUMER = "consumer-dl"


def _write_failures(client: redis.Redis, keys: Keys, ids: list[str]) -> None:
    """One dead letter per id, as a consumer writes it after the handler raised; then junk."""
    writer = Writer(client, keys, 60_000, 0.2, tagged("[test]"), threading.Event(), 1.0)
    for message_id in ids:
        message = parse(json.dumps({"message_id": message_id}).encode(), 1024)
        assert isinstance(message, Message)
        failed = handler_failed(message, f"handler raised ValueError: {message_id}", 1024)
        assert writer.write([failed], CONSUMER, "") is not None
    junk = parse(b"not json", 1024)
    assert not isinstance(junk, Message)
    assert writer.write([junk], CONSUMER, "") is not None


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return processor_cli("dead-letters", "--redis-url", redis_url, *args)


def test_dead_letters_are_listed_newest_first_with_a_limit_and_a_reason_filter(
    client: redis.Redis, keys: Keys
) -> None:
    _write_failures(client, keys, ["m-1", "m-2", "m-3"])
    everything = select(client, keys, by_reason(None))
    assert [letter.message_id for letter in everything] == ["", "m-3", "m-2", "m-1"]
    assert [letter.reason_code for letter in everything] == ["invalid_json"] + ["handler_error"] * 3
    assert everything[1].reason == "handler raised ValueError: m-3"
    assert everything[1].consumer_id == CONSUMER
    assert everything[1].raw == b'{"message_id": "m-3"}'
    two = select(client, keys, by_reason("handler_error"), limit=2)
    assert [letter.message_id for letter in two] == ["m-3", "m-2"]
    assert select(client, keys, by_reason("too_deep")) == []


def test_the_reason_filter_reads_past_the_first_page(
    client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletters, "PAGE", 7)
    _write_failures(client, keys, ["oldest"])
    with client.pipeline(transaction=False) as pipe:
        for n in range(30):
            pipe.xadd(
                keys.dead,
                {"reason_code": "invalid_json", "reason": "invalid JSON", "raw": b"x%d" % n},
            )
        pipe.execute()
    found = select(client, keys, by_reason("handler_error"))
    assert [letter.message_id for letter in found] == ["oldest"]
    assert len(select(client, keys, by_reason(None))) == 32


def test_an_entry_written_before_the_fields_existed_is_listed_with_its_code_and_time(
    client: redis.Redis, keys: Keys
) -> None:
    client.xadd(
        keys.dead,
        {
            "reason": "handler timed out after 5 s",
            "raw": b'{"message_id":"old"}',
            "consumer_id": "c",
        },
        id="1796292104123-0",
    )
    (letter,) = select(client, keys, by_reason(None))
    assert letter.reason_code == "handler_timeout"
    assert letter.time == "2026-12-03T10:01:44.123Z"  # the entry id's, in UTC
    assert letter.message_id == ""  # not in the entry: the listing shows what was written


def test_the_command_prints_a_table_and_json(
    redis_url: str, client: redis.Redis, keys: Keys
) -> None:
    _write_failures(client, keys, ["m-1", "m-2"])
    text = _cli(redis_url, "--count", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == [
        "ENTRY",
        "TIME",
        "(UTC)",
        "REASON",
        "CODE",
        "MESSAGE",
        "ID",
        "REASON",
    ]
    assert len(lines) == 3
    assert "invalid_json" in lines[1] and "invalid JSON" in lines[1]
    assert "m-2" in lines[2] and "handler_error" in lines[2]
    as_json = _cli(redis_url, "--json", "--reason", "handler_error")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert [item["message_id"] for item in document] == ["m-2", "m-1"]
    assert document[0]["raw"] == '{"message_id": "m-2"}'
    assert document[0]["reason_code"] == "handler_error"
    assert document[0]["time"].endswith("Z")
    assert set(document[0]) == {
        "entry_id",
        "partition",
        "time",
        "reason_code",
        "reason",
        "message_id",
        "consumer_id",
        "raw",
    }


def test_no_dead_letters_says_so(redis_url: str) -> None:
    result = _cli(redis_url)
    assert (result.returncode, result.stdout.strip()) == (0, "no dead letters")
    assert render([]) == "no dead letters"


def test_an_unreachable_redis_is_one_line_and_exit_code_1() -> None:
    result = _cli("redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "processor dead-letters: error: cannot read the dead letters from redis://" in line


def test_an_unknown_reason_code_is_refused_with_the_choices(redis_url: str) -> None:
    result = _cli(redis_url, "--reason", "handler_exploded")
    assert result.returncode == 2
    assert "'handler_exploded' is not a reason code" in result.stderr
    assert all(code in result.stderr for code in REASON_CODES)
