"""Connections as the daemon's loops see them: outages, refusals, reconnects."""

from __future__ import annotations

import logging
import re

import pytest
import redis
from redis._parsers.base import BaseParser

from demo.redis_server import RedisServer
from processor.config import Settings
from processor.store import outage as outages
from processor.store.connection import command_client
from processor.store.outage import Downtime, Outage
from tests.helpers import logged, tagged

REFUSED = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [logged(record) for record in caplog.records if record.name == outages.__name__]


def test_downtime_counts_the_time_some_outage_was_on_once() -> None:
    downtime = Downtime()
    writes, beats = object(), object()
    downtime.begin(writes, now=10.0)
    downtime.begin(beats, now=11.0)  # overlapping outages count once
    assert downtime.total_s(now=12.0) == pytest.approx(2.0)
    downtime.end(writes, now=13.0)
    assert downtime.total_s(now=14.0) == pytest.approx(4.0)  # beats still out
    downtime.end(beats, now=15.0)
    downtime.end(beats, now=16.0)  # an outage ends once
    assert downtime.total_s(now=20.0) == pytest.approx(5.0)
    downtime.begin(writes, now=30.0)
    assert downtime.total_s(now=31.5) == pytest.approx(6.5)


def test_a_readonly_reply_drops_the_connection_so_the_retry_can_reach_a_new_primary(
    redis_server: RedisServer,
) -> None:
    replica = RedisServer(extra_config={"replicaof": f"127.0.0.1 {redis_server.port}"})
    replica.start()
    client = command_client(Settings(redis_url=replica.url), retries=0)
    try:
        before = client.client_id()
        with pytest.raises(redis.exceptions.ReadOnlyError):
            client.set("k", "v")
        assert client.client_id() != before
    finally:
        client.close()
        replica.stop()


def test_an_outage_says_every_repeat_interval_what_is_unavailable_why_and_for_how_long(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outages, "OUTAGE_REPEAT_S", 0.0)  # each retry is past the interval
    outage = Outage("Redis (writes)", tagged("[c1]"), detail=lambda: "holding 120 messages")
    caplog.set_level(logging.WARNING, logger=outages.__name__)
    for _ in range(3):
        outage.failed(REFUSED)
    outage.recovered()
    start, *repeats, back = outage_lines(caplog)
    assert start == (
        "[c1] Redis (writes) unavailable: Error 111 connecting to 127.0.0.1:1. Connection "
        "refused; retrying; holding 120 messages"
    )
    assert len(repeats) == 2
    for attempts, line in enumerate(repeats, start=2):
        assert re.fullmatch(
            rf"\[c1\] Redis \(writes\) still unavailable after \d+ s "
            rf"\({attempts} failed attempts\): Error 111 connecting to 127\.0\.0\.1:1\. "
            r"Connection refused; retrying; holding 120 messages",
            line,
        ), line
    assert back.startswith("[c1] Redis (writes) back after ")


def test_within_the_repeat_interval_an_outage_logs_only_its_start(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outages, "OUTAGE_REPEAT_S", 3600.0)
    outage = Outage("Redis (heartbeat)")
    caplog.set_level(logging.WARNING, logger=outages.__name__)
    for _ in range(5):
        outage.failed(REFUSED)
    assert len(outage_lines(caplog)) == 1


def test_a_refusal_that_lasts_is_repeated_as_a_refusal(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outages, "OUTAGE_REPEAT_S", 0.0)
    outage = Outage("Redis (writes)", detail=lambda: "")  # nothing held: nothing appended
    caplog.set_level(logging.WARNING, logger=outages.__name__)
    full = BaseParser.parse_error("OOM command not allowed when used memory > 'maxmemory'.")  # type: ignore[no-untyped-call]
    outage.failed(full)
    outage.failed(full)
    repeat = outage_lines(caplog)[1].strip()  # no context: the line starts with a space
    assert re.fullmatch(
        r"Redis \(writes\) still refused after \d+ s \(2 failed attempts\): OOM command not "
        r"allowed when used memory > 'maxmemory'; retrying",
        repeat,
    ), repeat
