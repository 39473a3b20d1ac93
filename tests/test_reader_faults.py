"""Faults of the readers, end to end: the consumers that subscribe and feed the others.

Four consumers, two of them readers (slots 0 and 1): a reader killed, both readers killed one
after the other, a reader stalled past the heartbeat's TTL, a reader's subscription killed by
the server, and a fed consumer killed while the readers live; and both readers killed while they
handle their fed consumers' messages themselves (``SPREAD=auto``). Each time every message that
reached a subscriber is written exactly once, and the group is whole again.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import redis

from tests.faults_support import (
    FAST_SETTINGS,
    GAPS,
    LINGER_S,
    RATE,
    READERS,
    RECOVER_S,
    REPLACE_S,
    Daemon,
    Expected,
    Publisher,
    finish,
    publish_invalid,
    slot_of,
    start_daemon,
    start_publisher,
    subscriber_connections,
    subscribers,
    wait_for,
)
from tests.helpers import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

COUNT = 4


def by_role(daemon: Daemon) -> tuple[dict[int, str], dict[int, str]]:
    """(readers, fed consumers), each as pid -> consumer id."""
    ids = daemon.ids()
    readers = {pid: cid for pid, cid in ids.items() if slot_of(cid) < READERS}
    return readers, {pid: cid for pid, cid in ids.items() if pid not in readers}


def start(
    procs,
    redis_url: str,
    redis_client: redis.Redis,
    record: Path,
    rng: random.Random,
    duration: float,
    by: int,
    spread: str = "always",
) -> tuple[Daemon, Publisher]:
    """The group, and a publisher for ``duration`` s that has published a random part of its
    messages, from a tenth to 1/``by`` of them: the moment of the fault. With ``spread`` auto
    and this cheap handler, the readers handle their fed consumers' messages themselves."""
    daemon = start_daemon(
        procs, redis_url, "partitioned", count=COUNT, READERS_PER_HOST=READERS, SPREAD=spread
    )
    readers, fed = by_role(daemon)
    assert len(readers) == READERS and len(fed) == COUNT - READERS, daemon.ids()
    publish_invalid(redis_client, "readers")
    total = int(RATE * duration)
    publisher = start_publisher(procs, redis_url, record, duration)
    publisher.wait_published(rng.randint(total // 10, total // by))
    return daemon, publisher


def readers_subscribed(redis_client: redis.Redis) -> bool:
    return subscribers(redis_client) == READERS


def unreceived(records: list[tuple[str, int]]) -> list[str]:
    return [message_id for message_id, receivers in records if receivers == 0]


@pytest.mark.parametrize(
    ("both", "spread"),
    [(False, "always"), (True, "always"), (True, "auto")],
    ids=["one-reader", "both-readers", "both-readers-handling-their-fed-ones"],
)
def test_killed_readers_lose_nothing(
    procs, redis_url, bclient, tmp_path: Path, seed: int, both: bool, spread: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} both={both} spread={spread}"
    record = tmp_path / "record.txt"
    daemon, publisher = start(procs, redis_url, bclient, record, rng, 3.5, 4, spread)
    readers, _ = by_role(daemon)
    first, second = rng.sample(sorted(readers), 2)
    slot = slot_of(readers[first])
    os.kill(first, signal.SIGKILL)
    if both:
        # The second once the first's replacement has subscribed (a consumer registers once
        # subscribed): one reader lives throughout.
        def replaced() -> bool:
            return any(slot_of(cid) == slot and pid != first for pid, cid in daemon.ids().items())

        wait_for(replaced, REPLACE_S, f"{context}: first reader not replaced")
        time.sleep(rng.uniform(0.0, 0.3))  # the fault's timing, not a synchronisation
        os.kill(second, signal.SIGKILL)
    wait_for(daemon.in_step, REPLACE_S + LINGER_S, f"{context}: group not whole again")
    print(context, publisher.finish())
    records = publisher.records()
    assert not unreceived(records), f"{context}: published while no reader was subscribed"
    assert "moving to another reader" in daemon.log(), f"{context}: no fed consumer moved"
    finish(daemon, bclient, Expected(records), context)


def test_a_reader_stalled_past_the_ttl_loses_nothing(
    procs, redis_url, bclient, tmp_path: Path, seed: int
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed}"
    daemon, publisher = start(procs, redis_url, bclient, tmp_path / "record.txt", rng, 4.5, 4)
    readers, _ = by_role(daemon)

    def feeds(consumer_id: str) -> int:
        return int(bclient.hget(f"processor:consumer:{consumer_id}", "feeds") or 0)

    # A reader that feeds a consumer (each does, as the fed consumers spread over them).
    wait_for(lambda: all(feeds(cid) for cid in readers.values()), RECOVER_S, "feeds not shown")
    pid = rng.choice(sorted(readers))
    old_id = readers[pid]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: old_id not in daemon.listed(), LINGER_S, f"{context}: not declared dead")
        time.sleep(1.0)  # the stall is the fault: it outlasts the TTL by this much
    finally:
        os.kill(pid, signal.SIGCONT)
    ids = daemon.wait_in_step(RECOVER_S, f"{context}: stalled reader did not rejoin")
    assert ids.get(pid) not in (None, old_id), f"{context}: {pid} did not rejoin: {ids}"
    print(context, publisher.finish())
    log = daemon.log()
    assert "silent for" in log, f"{context}: the fed consumers did not notice the stall"
    finish(daemon, bclient, Expected(publisher.records()), context)


def test_a_readers_subscription_killed_by_the_server_loses_nothing(
    procs, redis_url, bclient, tmp_path: Path, seed: int
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed}"
    daemon, publisher = start(procs, redis_url, bclient, tmp_path / "record.txt", rng, 3.0, 3)
    gaps_before = bclient.xlen(GAPS)
    victim = rng.choice(subscriber_connections(bclient))
    assert bclient.client_kill_filter(_id=victim["id"]) == 1
    # The reader's own gap, and one for each consumer it fed, as they move to the other reader.
    wait_for(
        lambda: readers_subscribed(bclient) and bclient.xlen(GAPS) >= gaps_before + 2,
        RECOVER_S,
        f"{context}: subscription not back, or the gaps not reported",
    )
    print(context, publisher.finish())
    records = publisher.records()
    assert not unreceived(records), f"{context}: reached no subscriber with one reader left"
    assert "ending the feed of" in daemon.log(), f"{context}: the reader kept feeding"
    finish(daemon, bclient, Expected(records), context)


def test_a_fed_consumer_killed_has_its_messages_taken_over_from_the_readers(
    procs, redis_url, bclient, tmp_path: Path, seed: int
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed}"
    daemon, publisher = start(procs, redis_url, bclient, tmp_path / "record.txt", rng, 3.0, 3)
    _, fed = by_role(daemon)
    pid = rng.choice(sorted(fed))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: fed[pid] not in daemon.listed(), LINGER_S, message=f"{context}: listed")
    wait_for(daemon.in_step, REPLACE_S, f"{context}: not replaced")
    print(context, publisher.finish())
    finish(daemon, bclient, Expected(publisher.records()), context)
    # The readers held copies of what was routed to it, and tried them (skipping the written).
    taken = [int(n) for n in re.findall(r"consumer stopped: .* taken_over=(\d+)", daemon.log())]
    assert sum(taken) > 0, f"{context}: nothing taken over: {taken}"


def test_a_fed_consumer_killed_holding_messages_past_the_buffer_loses_nothing(
    procs, redis_url, bclient, tmp_path: Path
):
    """A slow handler's burst: each consumer holds messages unwritten for longer than
    TAKEOVER_BUFFER_MS. The readers keep their copies as long as a member holds one, so a fed
    consumer killed then loses nothing (without that, 158 of the 291 it held were lost)."""
    daemon = start_daemon(
        procs,
        redis_url,
        "partitioned",
        count=COUNT,
        READERS_PER_HOST=READERS,
        HANDLER="demo.bench_handlers:io_2ms",
    )
    _, fed = by_role(daemon)
    pid, victim = sorted(fed.items())[0]
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 0.5, rate=20_000)
    print(publisher.finish())
    buffer_ms = int(FAST_SETTINGS["TAKEOVER_BUFFER_MS"])

    def held_ms() -> int:
        return int(bclient.hget(f"processor:consumer:{victim}", "held_for_ms") or 0)

    wait_until(lambda: held_ms() > buffer_ms + 500, 30, message=lambda: f"held {held_ms()} ms")
    os.kill(pid, signal.SIGKILL)
    finish(daemon, bclient, Expected(publisher.records(), invalid={}), "held past the buffer")
