"""``processor status``: the group read from Redis, rendered for a person or as JSON.

The reading and the rendering are unit-tested on fakeredis (status only reads plain keys); the
command itself runs against a real daemon and a real redis-server.
"""

from __future__ import annotations

import json
import subprocess
import time

import fakeredis
import pytest

from processor.commands.status import read_group, render
from processor.config import StatusSettings
from processor.errors import ExitCode
from processor.store.keys import Keys
from tests.faults_support import start_daemon
from tests.helpers import processor_cli

SETTINGS = StatusSettings(redis_url="redis://example:6379/0")
KEYS = Keys.from_settings(SETTINGS)


@pytest.fixture
def fake() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def _consumer(fake: fakeredis.FakeRedis, consumer_id: str, rate: float, alive: bool = True) -> None:
    fake.rpush(KEYS.consumers, consumer_id)
    now_ms = int(time.time() * 1000)
    if alive:
        fake.set(KEYS.heartbeat(consumer_id), f"abcd:{now_ms - 65_000}", px=2000)
    fake.hset(
        KEYS.info(consumer_id),
        mapping={
            "host": "vm-1",
            "pid": 4242,
            "strategy": "partitioned",
            "rate": rate,
            "beat_ms": now_ms - 200,
            "written": 1000,
            "subscribed": 1,
        },
    )


def test_read_group_shows_live_consumers_counts_streams_dead_letters_and_gaps(fake):
    _consumer(fake, "vm-1-4242-0-aaaaaa", 1234.5)
    _consumer(fake, "vm-1-4243-1-bbbbbb", 10.0, alive=False)  # expired heartbeat: not live
    fake.hset(KEYS.stats, mapping={"written": 1500, "dead": 2, "skipped": 7})
    for n in range(3):
        fake.xadd(KEYS.output, {"message_id": f"m{n}"})
    fake.xadd(KEYS.dead, {"reason": "invalid JSON: nope", "raw": b"x", "consumer_id": "c1"})
    raised = {"reason": "handler raised ValueError: no", "raw": b'{"message_id": "m9"}'}
    fake.xadd(KEYS.dead, {**raised, "consumer_id": "c2", "message_id": "m9"})
    fake.xadd(KEYS.gaps, {"consumer_id": "c1", "start_ms": 1000, "end_ms": 1500})
    view = read_group(fake, SETTINGS)
    assert [c.consumer_id for c in view.consumers] == ["vm-1-4242-0-aaaaaa"]
    consumer = view.consumers[0]
    assert (consumer.host, consumer.pid, consumer.strategy) == ("vm-1", 4242, "partitioned")
    assert consumer.rate == 1234.5 and consumer.subscribed
    assert (view.written, view.dead, view.skipped) == (1500, 2, 7)
    assert view.streams == {"messages:processed": 3, "messages:dead": 2}
    # Newest first, with the message's id when it had one (not on entries from before).
    assert [letter["message_id"] for letter in view.dead_letters] == ["m9", ""]
    assert view.dead_letters[1]["reason"] == "invalid JSON: nope"
    assert "  m9  handler raised ValueError: no  (c2)" in render(view)
    assert view.gaps == [{"at_ms": 1000, "length_s": 0.5, "consumer_id": "c1"}]
    # Status only reads: the dead id is still listed for the next heartbeat to prune.
    assert fake.llen(KEYS.consumers) == 2

    text = render(view)
    assert "group: 1 live consumers | written 1,500 | dead-lettered 2" in text
    assert "messages:processed 3" in text
    line = next(line for line in text.splitlines() if line.startswith("vm-1-4242-0-aaaaaa"))
    assert "vm-1" in line and "4242" in line and "partitioned" in line and "1,234/s" in line
    assert "1m0" in line  # registered 65 s ago
    assert "0.2 s ago" in line and "subscribed" in line
    assert "invalid JSON: nope  (c1)" in text
    assert "0.500 s  c1" in text


def test_an_empty_group_says_so(fake):
    view = read_group(fake, SETTINGS)
    assert view.consumers == []
    text = render(view)
    assert "NO LIVE CONSUMER" in text and "last dead letters: none" in text


def test_the_url_shown_never_carries_the_password(fake):
    settings = StatusSettings(redis_url="redis://user:hunter2@example:6379/0")
    assert "hunter2" not in render(read_group(fake, settings))


def _status(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return processor_cli("status", "--redis-url", redis_url, *args)


def test_status_of_a_running_group_and_of_none(procs, redis_url):
    empty = _status(redis_url)
    assert empty.returncode == ExitCode.NO_CONSUMER == 5, empty.stderr
    assert "NO LIVE CONSUMER" in empty.stdout
    daemon = start_daemon(procs, redis_url, "partitioned", count=2)
    ids = set(daemon.listed())
    shown = _status(redis_url)
    assert shown.returncode == 0, shown.stderr
    assert "group: 2 live consumers" in shown.stdout
    for consumer_id in ids:
        assert consumer_id in shown.stdout
    as_json = _status(redis_url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert {c["consumer_id"] for c in document["consumers"]} == ids
    assert {c["strategy"] for c in document["consumers"]} == {"partitioned"}
    assert all(c["pid"] == int(c["consumer_id"].split("-")[-3]) for c in document["consumers"])
    daemon.stop("status test")
