"""Spreading: a reader handles the messages of the consumers it feeds itself while the handler
takes little of its time, and sends them their messages while it holds the reader up; every
message is written once across the changes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis

from processor.consumer.inbox import Inbox
from processor.consumer.ownership import PartitionedStrategy
from processor.consumer.spread import (
    KEEP_AT,
    LOAD_WINDOW_S,
    SPREAD_AT,
    HandlerLoad,
    Spread,
    load_if_kept,
)
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

HOLD_S = 5.0


def strategy_feeding(*fed: str) -> tuple[PartitionedStrategy, dict[str, list[bytes]]]:
    """A reader "r0" whose view holds another reader "r1" and the consumers it feeds."""
    strategy = PartitionedStrategy(10.0, 1000, 60.0, lambda now: 0.0, clock=lambda: 2.0)
    received: dict[str, list[bytes]] = {member: [] for member in fed}
    for member in fed:
        strategy.feed(member, received[member].extend)
    strategy.update(["r0", "r1", *fed], "r0", now=0.0)
    return strategy, received


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the routing, and the choice ----------------------------------------------------------------


def test_a_reader_that_does_not_spread_handles_its_fed_consumers_messages_itself() -> None:
    strategy, received = strategy_feeding("f2", "f3")
    own, family = strategy.lanes()
    assert 0 < own < family < 1024
    payloads = [b"m%d" % number for number in range(2000)]
    strategy.spread(False)
    owned = strategy.split(payloads, 1.0)
    assert not received["f2"] and not received["f3"]
    # Theirs and ours, not buffered: they are ours to write, and the other reader has copies.
    assert len(owned) == pytest.approx(len(payloads) * family / 1024, rel=0.15)
    assert strategy.buffered == len(payloads) - len(owned)
    strategy.spread(True)
    mine = strategy.split(payloads, 2.0)
    assert received["f2"] and received["f3"]
    assert len(mine) + len(received["f2"]) + len(received["f3"]) == len(owned)


def test_a_reader_that_starts_spreading_sends_its_fed_consumers_the_backlog_it_kept() -> None:
    strategy, received = strategy_feeding("f2", "f3")
    strategy.spread(False)
    inbox = Inbox()
    payloads = [b"m%d" % number for number in range(2000)]
    inbox.put(strategy.split(payloads, 1.0))
    held = len(inbox)
    strategy.spread(True)
    sent = inbox.keep(lambda chunk: strategy.send_to_fed(chunk, 1.5))
    theirs = received["f2"] + received["f3"]
    assert sent == len(theirs) > 0
    assert len(inbox) == held - sent
    kept = inbox.drain()
    assert not set(kept) & set(theirs)
    # As for any message sent to them: a copy stays for a takeover.
    buffered = strategy.buffered
    assert buffered == len(payloads) - held + sent


def test_the_load_kept_scales_our_share_to_the_lanes_we_would_handle() -> None:
    assert load_if_kept(0.2, spreading=False, own_lanes=100, family_lanes=500) == 0.2
    assert load_if_kept(0.2, spreading=True, own_lanes=100, family_lanes=500) == 1.0


def test_a_reader_spreads_when_the_handler_holds_it_up_and_takes_back_after_the_hold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    strategy, _ = strategy_feeding("f2", "f3")
    own, family = strategy.lanes()
    clock, load = Clock(), [0.0]
    spread = Spread(strategy, "auto", HOLD_S, lambda: load[0], lambda: 0, tagged("t"), clock)
    assert not strategy.spreading  # auto starts by handling them itself
    load[0] = SPREAD_AT - 0.01
    spread.beat()
    assert not strategy.spreading
    load[0] = SPREAD_AT
    spread.beat()
    assert strategy.spreading
    assert "sending the consumers we feed their messages: the handler took 50%" in caplog.text
    # Spreading, our own lanes' share: kept while handling theirs too would take KEEP_AT.
    load[0] = KEEP_AT * own / family
    clock.now += HOLD_S * 2
    spread.beat()
    assert strategy.spreading
    load[0] = (KEEP_AT - 0.01) * own / family
    clock.now += HOLD_S - 0.1
    spread.beat()
    assert strategy.spreading  # within the hold
    clock.now += 0.1
    spread.beat()
    assert not strategy.spreading
    assert "handling the messages of the consumers we feed ourselves" in caplog.text


def test_with_no_hold_a_busy_reader_keeps_spreading() -> None:
    strategy, _ = strategy_feeding("f2", "f3")
    clock = Clock()
    spread = Spread(strategy, "auto", 0.0, lambda: 0.9, lambda: 0, tagged("t"), clock)
    for _ in range(5):
        spread.beat()
        assert strategy.spreading  # the load, not only the hold, decides the take-back
        clock.now += 0.2


def test_a_reader_without_fed_consumers_never_spreads_and_always_always_does() -> None:
    alone, _ = strategy_feeding()
    Spread(alone, "auto", HOLD_S, lambda: 1.0, lambda: 0, tagged("t"), Clock()).beat()
    assert not alone.spreading
    strategy, _ = strategy_feeding("f2")
    spread = Spread(strategy, "always", HOLD_S, lambda: 0.0, lambda: 0, tagged("t"), Clock())
    spread.beat()
    assert strategy.spreading


def test_a_backlog_counts_for_a_slow_handler_only() -> None:
    slow, cheap = HandlerLoad(), HandlerLoad()
    slow.add(0.02, messages=100)  # 200 µs a message
    cheap.add(0.0002, messages=100)  # 2 µs a message
    # 5,000 held: a second of the slow handler's work ahead, a hundredth of the cheap one's.
    assert slow.load(5000) == pytest.approx(5000 * 200e-6 / LOAD_WINDOW_S)
    assert cheap.load(500_000) < SPREAD_AT  # its share only: it never spreads on a backlog


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
def test_fed_consumers_get_their_messages_while_the_handler_holds_the_readers_up(
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

    high = start_publisher(procs, redis_url, tmp_path / "high.txt", 6, rate=HIGH_RATE)
    wait_until(
        lambda: not standing_by(bclient, daemon),
        20,
        message=lambda: f"never spread; standing by: {standing_by(bclient, daemon)}",
    )
    high.finish()
    records += high.records()
    wait_until(lambda: writers(bclient) - set(range(READERS)), 30, message="no fed one wrote")

    # The load falls: once the hold is over, the readers handle their fed consumers' messages
    # themselves again, and the fed consumers finish what they hold.
    calm = start_publisher(procs, redis_url, tmp_path / "calm.txt", 6, rate=LOW_RATE // 2)
    wait_until(
        lambda: standing_by(bclient, daemon) == fed,
        30,
        message=lambda: f"still spread; standing by: {standing_by(bclient, daemon)}",
    )
    calm.finish()
    records += calm.records()
    log = daemon.log()
    assert "sending the consumers we feed their messages" in log
    assert "handling the messages of the consumers we feed ourselves" in log
    finish(daemon, bclient, Expected(records), "spread")
