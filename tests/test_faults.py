"""Fault injection, end to end: the real daemon and publisher as processes against redis-server.

Every test runs the publisher at a steady rate, injects one kind of fault at random instants
(seeded: the seed is printed, and ``FAULT_SEED=<seed>`` replays it), then checks that every
message recorded as received by at least one subscriber is in the output stream exactly once,
the invalid messages are in the dead-letter stream, CONSUMERS_LIST matches the running
consumers, and SIGTERM leaves no process behind.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import redis

from demo.redis_server import RedisServer
from tests.conftest import Processes
from tests.faults_support import (
    CHANNEL,
    GAPS,
    INVALID_PAYLOADS,
    LINGER_S,
    OUTPUT,
    RATE,
    RECOVER_S,
    REPLACE_S,
    START_S,
    Daemon,
    Expected,
    Veterans,
    client,
    command_connections,
    daemon_env,
    exists,
    fault_message,
    finish,
    group_alive,
    holds_copies,
    pid_of,
    publish_invalid,
    read_stream,
    running,
    settle,
    start_daemon,
    start_publisher,
    subscriber_connections,
    subscribers,
    wait_for,
)
from tests.helpers import wait_until
from tests.servers import Server

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

STRATEGIES = ["partitioned", "race"]


def kill_consumer(daemon: Daemon, pid: int, context: str) -> str | None:
    """SIGKILLs one consumer; asserts its id is pruned in time and the supervisor reaps it."""
    consumer_id = daemon.ids().get(pid)
    os.kill(pid, signal.SIGKILL)
    if consumer_id is not None:
        took = wait_for(
            lambda: consumer_id not in daemon.listed(),
            LINGER_S,
            f"{context}: killed {consumer_id} still listed after {LINGER_S:g} s",
        )
        print(f"{context}: killed {consumer_id}, unlisted after {took:.2f} s")
    # A killed child left unreaped would linger as a zombie.
    wait_until(lambda: not exists(pid), RECOVER_S, message=f"{context}: pid {pid} not reaped")
    return consumer_id


# -- 1. SIGKILL of consumers ------------------------------------------------------------------


# Race runs by default only against kills of consumers, the fault where the strategies differ
# most; every other fault (dropped subscriptions and connections, stalls, Redis restarts, failing
# handlers, pruning, kills faster than the heartbeat, which only ever lost messages with
# ownership: race tries everything everywhere) runs with race on demand (-m slow), keeping the
# default suite, with the Redis Cluster tests, under five minutes.
PARTITIONED_FIRST = ["partitioned", pytest.param("race", marks=pytest.mark.slow)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_killed_consumers_are_replaced_and_lose_nothing(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    context = f"FAULT_SEED={seed} strategy={strategy}"
    rng = random.Random(seed)
    kill_three_consumers(procs, redis_url, bclient, tmp_path, rng, strategy, context)


def test_killed_consumers_lose_nothing_on_every_server_of_the_matrix(
    procs, matrix_server: tuple[Server, RedisServer], tmp_path: Path, seed: int
):
    """The kills above on Redis 6.2, Redis 7.0 and Valkey (tests/servers.py)."""
    spec, server = matrix_server
    context = f"FAULT_SEED={seed} server={spec.id}"
    redis_client = client(server.url)
    try:
        rng = random.Random(seed)
        kill_three_consumers(procs, server.url, redis_client, tmp_path, rng, "partitioned", context)
    finally:
        redis_client.close()


def kill_three_consumers(
    procs: Processes,
    url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    rng: random.Random,
    strategy: str,
    context: str,
) -> None:
    """While the publisher runs for 5 s, SIGKILLs a random consumer, its replacement during
    start-up, then a random one later: each replaced, nothing lost or doubled."""
    daemon = start_daemon(procs, url, strategy)
    veterans = Veterans(daemon, strategy)
    veterans.holders()  # when each was first seen listed
    publish_invalid(redis_client, context)
    duration = 5.0
    total = int(RATE * duration)
    publisher = start_publisher(procs, url, tmp_path / "record.txt", duration)
    killed_pids: set[int] = set()
    killed_ids: set[str] = set()

    def kill(pid: int) -> None:
        killed_pids.add(pid)
        consumer_id = kill_consumer(daemon, pid, context)
        if consumer_id:
            killed_ids.add(consumer_id)

    # Once, at a random instant.
    publisher.wait_published(rng.randint(total // 10, total // 4))
    before = daemon.consumers()
    kill(rng.choice(sorted(before)))
    # Then its replacement, during start-up (spawned, importing, subscribing or registering).
    wait_until(
        lambda: daemon.consumers() - before,
        RECOVER_S,
        interval=0.005,
        message=f"{context}: no replacement consumer started",
    )
    newcomer = min(daemon.consumers() - before)
    time.sleep(rng.uniform(0.0, 0.6))  # the fault's timing, not a synchronisation
    kill(newcomer)
    took = wait_for(daemon.in_step, REPLACE_S, f"{context}: not replaced after the start-up kill")
    print(f"{context}: group whole again {took:.2f} s after the start-up kill")
    veterans.holders()
    # And again, a random running one, later in the run, once another holder of copies has
    # been live for a second (Veterans).
    publisher.wait_published(rng.randint(total // 2, total * 3 // 4))
    victim = rng.choice(sorted(daemon.consumers()))
    wait_for(lambda: veterans.may_kill(victim), REPLACE_S, f"{context}: no other veteran")
    kill(victim)
    took = wait_for(daemon.in_step, REPLACE_S, f"{context}: not replaced after the third kill")
    print(f"{context}: group whole again {took:.2f} s after the third kill")
    ids = daemon.ids()

    assert not killed_pids & set(ids), f"{context}: a killed pid is listed: {ids}"
    assert not killed_ids & set(ids.values()), f"{context}: a killed id is listed: {ids}"
    assert daemon.log().count("replacing it in") >= 3, f"{context}: supervisor did not report"
    print(context, publisher.finish())
    finish(daemon, redis_client, Expected(publisher.records()), context)


# -- 2. Pub/Sub connections dropped by the server ---------------------------------------------


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
def test_dropped_subscriptions_are_recovered_and_reported(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    daemon = start_daemon(procs, redis_url, strategy)
    publish_invalid(bclient, context)
    duration = 4.0
    total = int(RATE * duration)
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", duration)

    # Partitioned: two of the three consumers (the readers) subscribe; race: all three.
    subscribed = 2 if strategy == "partitioned" else 3
    # One subscription, while the others stay subscribed: nothing may be lost.
    publisher.wait_published(rng.randint(total // 10, total // 3))
    victim = rng.choice(subscriber_connections(bclient))
    assert bclient.client_kill_filter(_id=victim["id"]) == 1
    wait_for(
        lambda: subscribers(bclient) == subscribed and bclient.xlen(GAPS) >= 1,
        RECOVER_S,
        f"{context}: killed subscription not back, or its gap not reported",
    )
    gap = read_stream(bclient, GAPS)[0]
    assert gap[b"consumer_id"].decode() in daemon.listed(), f"{context}: gap {gap}"
    one_down_until = publisher.published()

    # All subscriptions at once: what is published before one is back reaches nobody.
    publisher.wait_published(max(one_down_until, rng.randint(total // 2, total * 4 // 5)))
    all_down_from = publisher.published()
    killed = bclient.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) == subscribed, f"{context}: CLIENT KILL TYPE pubsub killed {killed}"
    # A gap from each consumer: the readers' own, and the fed one's as it is fed again.
    wait_for(
        lambda: subscribers(bclient) == subscribed and bclient.xlen(GAPS) >= 4,
        RECOVER_S,
        f"{context}: subscriptions not back, or their gaps not reported",
    )
    print(context, publisher.finish())

    records = publisher.records()
    unreceived = [message_id for message_id, n in records[:all_down_from] if n == 0]
    assert not unreceived, f"{context}: reached no subscriber with one killed: {unreceived[:5]}"
    log = daemon.log()
    logged = log.count("subscribed again after a gap") + log.count("fed again by local reader")
    assert logged >= 4, f"{context}: gaps not logged"
    finish(daemon, bclient, Expected(records), context)


# -- 3. command connections dropped -----------------------------------------------------------


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
def test_dropped_command_connections_still_write_exactly_once(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    daemon = start_daemon(procs, redis_url, strategy)
    publish_invalid(bclient, context)
    duration = 4.0
    total = int(RATE * duration)
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", duration)

    def writers_connected() -> bool:
        # At least one each per consumer (a second thread may open a second one).
        names = command_connections(bclient)
        return names["processor-consumer"] >= 3 and names["processor-heartbeat"] >= 3

    # The writers', heartbeats', monitor's and publisher's connections, at random instants.
    for point in sorted(rng.sample(range(total // 10, total * 9 // 10), 4)):
        publisher.wait_published(point)
        killed = int(bclient.execute_command("CLIENT", "KILL", "TYPE", "normal"))
        assert killed >= 1, f"{context}: CLIENT KILL TYPE normal killed nothing"
        wait_for(writers_connected, RECOVER_S, f"{context}: writers did not reconnect")
    print(context, publisher.finish())
    finish(daemon, bclient, Expected(publisher.records()), context)


# -- 4. stalled consumers (SIGSTOP past the heartbeat, and past half the lock TTL) ------------


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
def test_stalled_consumers_rejoin_under_new_ids_without_duplicates(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    # A short dedup window, so the long stall outlasts half of it (the stalled consumer must
    # then drop what it holds rather than write it again).
    lock_ttl_s = 6.0
    daemon = start_daemon(
        procs, redis_url, strategy, TAKEOVER_BUFFER_MS=2500, DEDUP_WINDOW_MS=int(lock_ttl_s * 1000)
    )
    publish_invalid(bclient, context)
    duration = 5.0
    total = int(RATE * duration)
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", duration)

    short_s = 2.0  # past the heartbeat TTL, under half the lock TTL: held messages are written
    # Past half the lock TTL: held messages must be dropped. As long as the TTL itself, so the
    # locks of what it received early in its stall have expired when it wakes.
    long_s = lock_ttl_s
    # Early enough that the stalled consumers hold what is published while they sleep; the last
    # wakes about when the publisher ends, and the daemon is stopped right after it rejoins, so
    # the flush at shutdown also runs with whatever it still holds from before its stall.
    publisher.wait_published(rng.randint(total // 20, total // 10))
    ids = daemon.ids()
    # Two stalled at once; with partitioned, one reader and the fed consumer, so that a reader
    # holding copies lives throughout (both readers stalled is every subscription down).
    holders = sorted(pid for pid, cid in ids.items() if holds_copies(cid, strategy))
    others = sorted(set(ids) - set(holders)) or holders
    short_pid, long_pid = rng.sample([rng.choice(holders), rng.choice(others)], 2)
    if short_pid == long_pid:
        short_pid, long_pid = rng.sample(sorted(ids), 2)
    stalls = {short_pid: (short_s, ids[short_pid]), long_pid: (long_s, ids[long_pid])}
    order = [short_pid, long_pid] if rng.random() < 0.5 else [long_pid, short_pid]
    stopped_at: dict[int, float] = {}
    for index, pid in enumerate(order):
        if index:
            time.sleep(rng.uniform(0.1, 0.6))  # the fault's timing, not a synchronisation
        os.kill(pid, signal.SIGSTOP)
        stopped_at[pid] = time.monotonic()
    try:
        for pid in sorted(order, key=lambda p: stopped_at[p] + stalls[p][0]):
            length, old_id = stalls[pid]
            wait_for(
                lambda old_id=old_id: old_id not in daemon.listed(),
                LINGER_S,
                f"{context}: stalled {old_id} not declared dead",
            )
            # The stall is the fault: it lasts its length, then the consumer wakes.
            time.sleep(max(0.0, stopped_at[pid] + length - time.monotonic()))
            os.kill(pid, signal.SIGCONT)
    finally:
        for pid in order:
            os.kill(pid, signal.SIGCONT)
    ids_after = daemon.wait_in_step(RECOVER_S, f"{context}: stalled consumers did not rejoin")
    for pid, (_, old_id) in stalls.items():
        assert pid in ids_after and ids_after[pid] != old_id, (
            f"{context}: pid {pid} (was {old_id}) did not rejoin under a new id: {ids_after}"
        )
    # A rejoin is logged just after its new id registers.
    wait_until(
        lambda: daemon.log().count("rejoined after a stall") >= 2,
        RECOVER_S,
        message=f"{context}: rejoins not logged",
    )
    log = daemon.log()
    assert "past half the dedup window: dropped" in log, f"{context}: long stall kept its messages"
    # A stall is told from a heartbeat key lost before its TTL (a FLUSHALL).
    assert log.count("heartbeat had expired: the group declared us dead") >= 2, context
    assert "our heartbeat key was gone" not in log, context
    print(context, publisher.finish())
    finish(daemon, bclient, Expected(publisher.records()), context)


# -- 5. handler faults ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
def test_failing_handlers_dead_letter_their_messages_and_the_rest_keep_flowing(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    timeout_s = 0.5
    daemon = start_daemon(
        procs,
        redis_url,
        strategy,
        count=2,
        HANDLER="tests.faults_support:faulty",
        HANDLER_TIMEOUT=timeout_s,
    )
    publish_invalid(bclient, context)
    duration = 4.0
    total = int(RATE * duration)
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", duration)
    reasons = {
        "raise": "handler raised ValueError: boom for",
        "hang": f"handler timed out after {timeout_s:g} s",
        "not_a_dict": "handler returned list, not a dict",
    }
    faults = [*reasons] * 2 + ["slow"] * 3
    rng.shuffle(faults)
    dead_valid: dict[str, str] = {}
    extra_written: set[str] = set()
    points = sorted(rng.sample(range(total // 10, total * 9 // 10), len(faults)))
    for number, (fault, point) in enumerate(zip(faults, points, strict=True)):
        publisher.wait_published(point)
        message_id, payload = fault_message(fault, number, seed)
        assert bclient.publish(CHANNEL, payload) >= 1, f"{context}: {message_id} not received"
        if fault == "slow":
            extra_written.add(message_id)
        else:
            dead_valid[message_id] = reasons[fault]
    print(context, publisher.finish())
    expected = Expected(publisher.records(), dead_valid=dead_valid, extra_written=extra_written)
    # Keeping up: everything is in within a few seconds of the last message, hangs included.
    wait_for(
        lambda: settle(bclient, expected, timeout=0.1),
        RECOVER_S,
        f"{context}: the consumers did not keep up around the failing handler",
    )
    finish(daemon, bclient, expected, context)


# -- 6. Redis restart -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
def test_redis_restart_is_survived_without_a_daemon_restart_and_the_gap_reported(
    private_redis, procs, tmp_path: Path, seed: int, strategy: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    url = private_redis.url
    redis_client = client(url)
    daemon = start_daemon(procs, url, strategy)
    consumers_before = daemon.consumers()
    duration = 4.0
    total = int(RATE * duration)
    publisher = start_publisher(procs, url, tmp_path / "record.txt", duration)

    publisher.wait_published(rng.randint(total // 5, total // 2))
    down_ms = int(time.time() * 1000)
    private_redis.restart(keep_data=True)
    up_ms = int(time.time() * 1000)
    print(f"{context}: Redis down for {up_ms - down_ms} ms")

    def gap_reported() -> bool:
        return any(
            int(gap[b"start_ms"]) <= up_ms and int(gap[b"end_ms"]) >= down_ms
            for gap in read_stream(redis_client, GAPS)
        )

    wait_for(gap_reported, RECOVER_S, f"{context}: no gap covering the restart in {GAPS}")
    daemon.wait_in_step(RECOVER_S, f"{context}: CONSUMERS_LIST not repopulated after the restart")
    assert daemon.proc.poll() is None, f"{context}: the daemon exited"
    assert daemon.consumers() == consumers_before, f"{context}: consumers were restarted"
    publish_invalid(redis_client, context)
    print(context, publisher.finish())
    assert "subscribed again after a gap" in daemon.log(), f"{context}: gap not logged"
    expected = Expected(publisher.records(), strict_unknown=False)
    try:
        finish(daemon, redis_client, expected, context)
    finally:
        redis_client.close()


# Each refusal: the setting that makes Redis refuse writes, and the value that ends it.
REFUSALS = {
    "OOM": ("maxmemory", "1", "0"),  # maxmemory reached, noeviction (Redis's default policy)
    "NOREPLICAS": ("min-replicas-to-write", "1", "0"),  # and no replica
}


@pytest.mark.parametrize(
    ("code", "server"),
    # Redis 6.2 reports a refusal inside a script as the script's error: its own case.
    [("OOM", "private_redis"), ("NOREPLICAS", "private_redis"), ("NOREPLICAS", "redis62")],
)
def test_redis_refusing_writes_is_waited_out_and_nothing_held_is_lost(
    procs, tmp_path: Path, seed: int, code: str, server: str, request: pytest.FixtureRequest
):
    """Writes refused for seconds, longer than the heartbeat TTL and the takeover buffer, and a
    consumer killed meanwhile: the others stay, hold what they receive (the killed one's share
    in their takeover buffers, which do not age while Redis refuses writes), and write it once
    Redis takes writes again."""
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} refusal={code} server={server}"
    url = request.getfixturevalue(server).url
    redis_client = client(url)
    buffer_s = 2.0
    daemon = start_daemon(procs, url, "partitioned", TAKEOVER_BUFFER_MS=int(buffer_s * 1000))
    consumers_before = daemon.consumers()
    publish_invalid(redis_client, context)
    duration = 6.0
    total = int(RATE * duration)
    publisher = start_publisher(procs, url, tmp_path / "record.txt", duration)

    setting, refuse, allow = REFUSALS[code]
    publisher.wait_published(rng.randint(total // 6, total // 4))
    redis_client.config_set(setting, refuse)
    refused_at = time.monotonic()
    try:
        wait_for(
            lambda: f"refused: {code} " in daemon.log(),
            RECOVER_S,
            f"{context}: the refusal was not logged",
        )
        before = redis_client.xlen(OUTPUT)
        publisher.wait_published(total // 2)
        killed = rng.choice(sorted(consumers_before))
        os.kill(killed, signal.SIGKILL)
        publisher.wait_published(total * 5 // 6)
        assert redis_client.xlen(OUTPUT) == before, f"{context}: written while refused"
    finally:
        redis_client.config_set(setting, allow)
    refused_s = time.monotonic() - refused_at
    print(f"{context}: writes refused for {refused_s:.1f} s")
    assert refused_s > buffer_s, f"{context}: refused for {refused_s:.1f} s only"
    print(context, publisher.finish())
    assert daemon.proc.poll() is None, f"{context}: the daemon exited"
    survivors = consumers_before - {killed}
    assert survivors < daemon.consumers(), f"{context}: consumers left or were replaced"
    assert "thread died" not in daemon.log(), f"{context}: a thread died"
    try:
        finish(daemon, redis_client, Expected(publisher.records()), context)
    finally:
        redis_client.close()


# -- 7. SIGKILL of the whole daemon, and a second daemon ---------------------------------------


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
def test_killed_daemons_ids_are_pruned_by_the_next_daemon(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    first = start_daemon(procs, redis_url, strategy)
    first_ids = set(first.listed())
    first_consumers = first.consumers()
    first_publisher = start_publisher(procs, redis_url, tmp_path / "first.txt", 1.5)
    first_publisher.wait_published(rng.randint(RATE // 4, RATE * 5 // 4))

    os.killpg(first.pid, signal.SIGKILL)  # supervisor and consumers: no finally runs
    killed_at = time.monotonic()
    first.proc.wait(timeout=10)
    wait_until(
        lambda: not any(running(pid) for pid in first_consumers),
        RECOVER_S,
        message=f"{context}: killed consumers still running",
    )
    wait_until(
        lambda: subscribers(bclient) == 0,
        RECOVER_S,
        message=f"{context}: killed consumers' subscriptions not closed",
    )
    print(context, first_publisher.finish())
    # Nobody is left to prune them.
    assert set(first.listed()) == first_ids, f"{context}: {first.listed()} != {first_ids}"
    first.close()

    second_env = daemon_env(redis_url, strategy, 3, {"HOST_ID": "second-daemon"})
    second = Daemon(procs, procs.start(["demo/consume.py"], env=second_env), redis_url, 3)
    publisher = start_publisher(procs, redis_url, tmp_path / "second.txt", 2.5)
    wait_for(
        lambda: set(second.listed()) - first_ids,
        START_S,
        f"{context}: the second daemon registered no consumer",
    )
    joined_at = time.monotonic()
    # A dead id lingers until its heartbeat expires and a live consumer's beat prunes it.
    wait_for(
        lambda: not first_ids & set(second.listed()),
        LINGER_S,
        f"{context}: the killed daemon's ids still listed {LINGER_S:g} s after a new consumer "
        f"joined: {second.listed()}",
    )
    print(
        f"{context}: old ids unlisted {time.monotonic() - killed_at:.2f} s after the kill, "
        f"{time.monotonic() - joined_at:.2f} s after the second daemon's first consumer joined"
    )
    second.wait_in_step(START_S, f"{context}: second daemon")
    publish_invalid(bclient, context)
    wait_until(
        lambda: not group_alive(first.pid),
        RECOVER_S,
        message=f"{context}: the killed daemon's process group is still there",
    )
    print(context, publisher.finish())
    # What the killed daemon had received and not written is lost: no consumer survived to take
    # it over. Nothing may be doubled, and everything the second daemon received is written.
    first_published = {message_id for message_id, _ in first_publisher.records()}
    expected = Expected(publisher.records(), optional=first_published)
    finish(second, bclient, expected, context)


# -- 8. kills faster than the heartbeat TTL ---------------------------------------------------


# The daemon's own heartbeat defaults: a killed consumer's heartbeat outlives it by two seconds,
# so every kill below lands before the previous victim's heartbeat has expired.
DEFAULT_HEARTBEAT = {"HEARTBEAT_INTERVAL_MS": 500, "HEARTBEAT_TTL_MS": 2000}


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
def test_the_original_consumers_killed_one_after_another_lose_nothing(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    daemon = start_daemon(procs, redis_url, strategy, **DEFAULT_HEARTBEAT)
    publish_invalid(bclient, context)
    duration = 6.0
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", duration)
    publisher.wait_published(rng.randint(RATE // 2, RATE))
    # Each original consumer in turn, about 0.6 s apart: each is replaced at once, so one is
    # always subscribed, but each victim's share lives only in the others' buffers.
    victims = sorted(daemon.consumers())
    rng.shuffle(victims)
    veterans = Veterans(daemon, strategy)

    for index, pid in enumerate(victims):
        if index:
            time.sleep(rng.uniform(0.3, 0.8))  # the fault's timing, not a synchronisation
        wait_for(
            lambda pid=pid: veterans.may_kill(pid),
            REPLACE_S,
            f"{context}: no other reader live for a second",
        )
        os.kill(pid, signal.SIGKILL)
        print(f"{context}: killed pid {pid}")
    daemon.wait_in_step(REPLACE_S, f"{context}: not replaced after the kills")
    print(context, publisher.finish())
    finish(daemon, bclient, Expected(publisher.records()), context)


@pytest.mark.parametrize("strategy", PARTITIONED_FIRST)
@pytest.mark.parametrize("storm_s", [8.0, pytest.param(30.0, marks=pytest.mark.slow)])
def test_a_kill_every_second_for_a_storm_loses_nothing(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str, storm_s: float
):
    """A kill every 0.5-1 s, each inside the previous victim's heartbeat TTL: 8 s by default,
    30 s with -m slow."""
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    daemon = start_daemon(procs, redis_url, strategy, **DEFAULT_HEARTBEAT)
    publish_invalid(bclient, context)
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", storm_s + 2)
    publisher.wait_published(RATE // 2)
    veterans = Veterans(daemon, strategy)

    kills = 0
    ends_at = time.monotonic() + storm_s
    next_kill = time.monotonic() + rng.uniform(0.5, 1.0)
    while time.monotonic() < ends_at:
        now = time.monotonic()
        old = veterans.holders()
        if now >= next_kill:
            running_now = daemon.consumers()
            # Never the last holder of copies that has been live for a second.
            candidates = sorted(pid for pid in running_now if old - {pid})
            if candidates:
                victim = rng.choice(candidates)
                os.kill(victim, signal.SIGKILL)
                kills += 1
            next_kill = now + rng.uniform(0.5, 1.0)
        time.sleep(0.02)  # polls the group while the storm lasts
    print(f"{context}: {kills} kills in {storm_s:g} s")
    assert kills >= storm_s / 1.5, f"{context}: only {kills} kills"
    daemon.wait_in_step(REPLACE_S, f"{context}: not replaced after the storm")
    print(context, publisher.finish())
    finish(daemon, bclient, Expected(publisher.records()), context)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_schedule_of_mixed_faults_loses_nothing(
    procs, redis_url, bclient, tmp_path: Path, seed: int, strategy: str
):
    """kill -9, CLIENT KILL of a subscriber, or SIGSTOP for 0.5-4 s, one at a time, for 12 s."""
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy={strategy}"
    daemon = start_daemon(procs, redis_url, strategy, **DEFAULT_HEARTBEAT)
    publish_invalid(bclient, context)
    total = 36_000
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", total / RATE)
    invalid = dict(INVALID_PAYLOADS)
    faults: list[str] = []
    while publisher.proc.poll() is None:
        fault = rng.choice(["kill", "client-kill", "stop"])
        pids = sorted(daemon.consumers())
        if fault == "kill":
            os.kill(rng.choice(pids), signal.SIGKILL)
        elif fault == "client-kill":
            victim = rng.choice(subscriber_connections(bclient))
            bclient.client_kill_filter(_id=victim["id"])
        else:
            pid = rng.choice(pids)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(rng.uniform(0.5, 4.0))  # the stall is the fault
            os.kill(pid, signal.SIGCONT)
        faults.append(fault)
        # Invalid messages along the way: each must be dead-lettered exactly once.
        payload = f"not json, after fault {len(faults)}".encode()
        if bclient.publish(CHANNEL, payload) >= 1:
            invalid[payload] = "invalid JSON"
        wait_for(
            lambda: (
                subscribers(bclient) == (2 if strategy == "partitioned" else 3) and daemon.in_step()
            ),
            RECOVER_S,
            f"{context}: group not whole again after {fault}",
        )
        time.sleep(rng.uniform(0.3, 1.2))  # the schedule's pause, not a synchronisation
    print(f"{context}: faults {faults}")
    print(context, publisher.finish())
    finish(daemon, bclient, Expected(publisher.records(), invalid=invalid), context)


def test_a_whole_daemon_killed_beside_another_is_taken_over_when_its_heartbeats_expire(
    procs, redis_url, bclient, tmp_path: Path, seed: int
):
    """No supervisor is left to announce the deaths: the heartbeat TTL is the backstop."""
    rng = random.Random(seed)
    context = f"FAULT_SEED={seed} strategy=partitioned"
    env = daemon_env(redis_url, "partitioned", 2, DEFAULT_HEARTBEAT)
    # Two daemons on one machine register as two hosts: each needs its own host id.
    doomed_env = {**env, "HOST_ID": "doomed"}
    doomed = Daemon(procs, procs.start(["demo/consume.py"], env=doomed_env), redis_url, 2)
    survivor_env = {**env, "HOST_ID": "survivor"}
    survivor = Daemon(procs, procs.start(["demo/consume.py"], env=survivor_env), redis_url, 2)
    wait_for(lambda: len(survivor.listed()) == 4, START_S, f"{context}: 4 consumers not listed")
    doomed_ids = set(doomed.listed()) - {
        cid for cid in doomed.listed() if pid_of(cid) in survivor.consumers()
    }
    publish_invalid(bclient, context)
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 5.0)
    publisher.wait_published(rng.randint(RATE // 2, RATE * 2))
    os.killpg(doomed.pid, signal.SIGKILL)  # supervisor and consumers: a host lost
    took = wait_for(
        lambda: not doomed_ids & set(survivor.listed()),
        LINGER_S + 2,
        f"{context}: the killed daemon's ids still listed",
    )
    print(f"{context}: killed daemon's ids unlisted {took:.2f} s after the kill")
    print(context, publisher.finish())
    doomed.close()
    finish(survivor, bclient, Expected(publisher.records()), context)
