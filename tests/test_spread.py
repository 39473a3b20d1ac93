"""Spreading: the fed consumers stand by while the handler costs the readers little, and own
their lanes while it holds them up; every message is written once across the changes."""

from __future__ import annotations

import logging
from pathlib import Path

import fakeredis
import pytest
import redis

from processor.config import Settings
from processor.consumer.membership import FED_TOKEN, View, parse_view
from processor.consumer.spread import (
    KEEP_AT,
    LOAD_WINDOW_S,
    SPREAD_AT,
    HandlerLoad,
    Spread,
    calls_for_spreading,
    readers_load,
    working_members,
)
from processor.store.keys import Keys
from tests.faults_support import (
    READERS,
    Daemon,
    Expected,
    finish,
    publish_invalid,
    slot_of,
    start_daemon,
    start_publisher,
)
from tests.helpers import processor_cli, tagged, wait_until

KEYS = Keys.from_settings(Settings())
VIEW = View(alive=True, members={"r0": 1, "r1": 1, "f2": 1, "f3": 1}, fed=frozenset({"f2", "f3"}))


# -- the decision, pure ---------------------------------------------------------------------------


def test_a_view_tells_the_fed_consumers_by_their_token() -> None:
    reply = [b"1", b"r0", b"ab12cd34:100", b"f2", f"{FED_TOKEN}ab12cd34:200".encode()]
    view = parse_view(reply)
    assert view.members == {"r0": 100, "f2": 200}
    assert view.fed == {"f2"}


def test_the_readers_own_every_lane_unless_the_group_spreads() -> None:
    assert working_members(VIEW, spreading=False) == {"r0", "r1"}
    assert working_members(VIEW, spreading=True) == {"r0", "r1", "f2", "f3"}


def test_the_readers_load_is_ours_scaled_to_the_readers_alone() -> None:
    # Four working members, two readers: the readers alone would carry twice our share each.
    assert readers_load(0.2, working=4, readers=2) == pytest.approx(0.4)
    assert readers_load(0.2, working=2, readers=2) == pytest.approx(0.2)
    assert readers_load(0.2, working=3, readers=0) == pytest.approx(0.6)  # no reader: as one


def test_spreading_starts_and_stops_at_thresholds_apart() -> None:
    assert not calls_for_spreading(SPREAD_AT - 0.01, spreading=False)
    assert calls_for_spreading(SPREAD_AT, spreading=False)
    # Once spreading, it is kept down to KEEP_AT, so a load between the two does not flap.
    assert calls_for_spreading(KEEP_AT, spreading=True)
    assert not calls_for_spreading(KEEP_AT - 0.01, spreading=True)


def test_a_backlog_counts_for_a_slow_handler_only() -> None:
    slow, cheap = HandlerLoad(), HandlerLoad()
    slow.add(0.02, messages=100)  # 200 µs a message
    cheap.add(0.0002, messages=100)  # 2 µs a message
    # 5,000 held: a second of the slow handler's work ahead, a hundredth of the cheap one's.
    assert slow.load(5000) == pytest.approx(5000 * 200e-6 / LOAD_WINDOW_S)
    assert cheap.load(500_000) < SPREAD_AT  # its share only: it never spreads on a backlog


# -- one member's side, against fakeredis -------------------------------------------------------


def _spread(client: redis.Redis, mode: str, share: float) -> Spread:
    return Spread(client, KEYS, mode, hold_ms=5000, handler_load=lambda: share, tagged=tagged("t"))


def test_a_busy_reader_sets_the_groups_key_and_every_member_follows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client = fakeredis.FakeRedis()
    other = _spread(client, "auto", share=0.0)
    assert other.working(VIEW, "f2") == {"r0", "r1"}
    busy = _spread(client, "auto", share=SPREAD_AT)
    assert busy.working(VIEW, "r0") == {"r0", "r1", "f2", "f3"}
    assert 0 < client.pttl(KEYS.spread) <= 5000
    assert "the readers alone would spend 50% of their time in the handler" in caplog.text
    assert other.working(VIEW, "f2") == {"r0", "r1", "f2", "f3"}
    # The key lapses (nobody's load calls for it any more): the readers take every lane back.
    client.delete(KEYS.spread)
    assert other.working(VIEW, "f2") == {"r0", "r1"}
    assert "the group stopped spreading" in caplog.text


def test_a_standing_by_consumer_never_starts_spreading() -> None:
    client = fakeredis.FakeRedis()
    # A fed consumer still draining what it owned: busy, but it owns no lanes now.
    assert _spread(client, "auto", share=1.0).working(VIEW, "f2") == {"r0", "r1"}
    assert not client.exists(KEYS.spread)


def test_spread_always_sets_the_key_so_that_every_host_agrees() -> None:
    client = fakeredis.FakeRedis()
    assert _spread(client, "always", share=0.0).working(VIEW, "r0") == set(VIEW.members)
    assert client.exists(KEYS.spread)
    assert _spread(client, "auto", share=0.0).working(VIEW, "r1") == set(VIEW.members)


def test_a_group_without_fed_consumers_sends_no_command() -> None:
    client = fakeredis.FakeRedis()
    readers = View(alive=True, members={"r0": 1, "r1": 1})
    assert _spread(client, "always", share=1.0).working(readers, "r0") == {"r0", "r1"}
    assert not client.exists(KEYS.spread)


# -- end to end -----------------------------------------------------------------------------------

COUNT = 4
HOLD_MS = 1500
# The handler waits 2 ms a message: the readers alone spend about 10% of their time in it at
# LOW_RATE and about 70% at HIGH_RATE.
HANDLER = "demo.bench_handlers:io_2ms"
LOW_RATE, HIGH_RATE = 100, 700


def standing_by(client: redis.Redis, daemon: Daemon) -> set[str]:
    return {
        consumer_id
        for consumer_id in daemon.ids().values()
        if client.hget(f"processor:consumer:{consumer_id}", "standby") == b"1"
    }


def writers(client: redis.Redis) -> set[int]:
    """The slots of the consumers that wrote to the output stream."""
    entries = client.xrange("messages:processed")
    return {slot_of(fields[b"consumer_id"].decode()) for _, fields in entries}


@pytest.mark.faults
@pytest.mark.timeout(150)
def test_fed_consumers_take_lanes_while_the_handler_holds_the_readers_up(
    procs, redis_url, bclient, tmp_path: Path
) -> None:
    daemon = start_daemon(
        procs,
        redis_url,
        "partitioned",
        count=COUNT,
        SPREAD="auto",
        SPREAD_HOLD_MS=HOLD_MS,
        HANDLER=HANDLER,
    )
    fed = {cid for cid in daemon.ids().values() if slot_of(cid) >= READERS}
    assert len(fed) == COUNT - READERS
    wait_until(lambda: standing_by(bclient, daemon) == fed, 10, message="fed not standing by")
    status = processor_cli("status", "--redis-url", redis_url).stdout
    assert status.count("fed, standing by") == len(fed), status
    publish_invalid(bclient, "spread")
    records = []

    low = start_publisher(procs, redis_url, tmp_path / "low.txt", 3, rate=LOW_RATE)
    low.finish()
    records += low.records()
    wait_until(lambda: bclient.xlen("messages:processed") >= len(records), 30)
    assert writers(bclient) <= set(range(READERS)), "a standing-by consumer wrote"

    high = start_publisher(procs, redis_url, tmp_path / "high.txt", 10, rate=HIGH_RATE)
    wait_until(
        lambda: not standing_by(bclient, daemon),
        20,
        message=lambda: f"never spread; standing by: {standing_by(bclient, daemon)}",
    )
    high.finish()
    records += high.records()
    wait_until(lambda: writers(bclient) - set(range(READERS)), 30, message="no fed one wrote")

    # The load falls: once the handler's share has left the readers' window and the hold is
    # over, the readers take every lane back, and the fed consumers finish what they hold.
    calm = start_publisher(procs, redis_url, tmp_path / "calm.txt", 12, rate=LOW_RATE // 2)
    wait_until(
        lambda: standing_by(bclient, daemon) == fed,
        30,
        message=lambda: f"still spread; standing by: {standing_by(bclient, daemon)}",
    )
    calm.finish()
    records += calm.records()
    log = daemon.log()
    assert "the group spreads: fed consumers take their share" in log
    assert "the group stopped spreading: the readers take back every lane" in log
    finish(daemon, bclient, Expected(records), "spread")
