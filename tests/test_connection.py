"""Connections as the daemon's loops see them: outages, refusals, reconnects."""

from __future__ import annotations

import pytest
import redis

from demo.redis_server import RedisServer
from processor.config import Settings
from processor.connection import Downtime, command_client


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
