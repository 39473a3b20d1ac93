"""Cluster mode end to end: the daemon and the publisher on a local Redis Cluster (three
primaries with a replica each), with messages spread over partitions, one of whose primaries
is killed mid-run in the second test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from demo.redis_cluster import LocalCluster
from processor.config import Settings
from processor.store.connection import REDIS_ERRORS, command_client
from processor.store.keys import Keys
from processor.store.partitions import partition_of
from tests.faults_support import (
    FAST_SETTINGS,
    HEARTBEAT_TTL_MS,
    INVALID_PAYLOADS,
    REPO_ROOT,
    wait_for_result,
)
from tests.helpers import wait_until

PARTITIONS = 3
CONSUMERS = 2
RATE = 2000


def cluster_env(url: str, **overrides: object) -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **FAST_SETTINGS,
        "REDIS_URL": url,
        "REDIS_CLUSTER": "true",
        "PARTITIONS": str(PARTITIONS),
        "CONSUMERS_COUNT": str(CONSUMERS),
        "PYTHONPATH": python_path,
    }
    env.update({name: str(value) for name, value in overrides.items()})
    return env


def command(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``processor <args>`` against the cluster."""
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **cluster_env(cluster.url)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def keys_for(url: str) -> Keys:
    return Keys.from_settings(Settings(redis_url=url, redis_cluster=True, partitions=PARTITIONS))


def start_daemon(procs: Any, cluster: LocalCluster, **overrides: object) -> Any:
    """Starts demo/consume.py; returns once every consumer is listed and subscribed."""
    proc = procs.start(["demo/consume.py"], env=cluster_env(cluster.url, **overrides))
    client = RedisCluster.from_url(cluster.url)
    keys = keys_for(cluster.url)

    def ready() -> bool:
        assert proc.poll() is None, f"daemon exited with {proc.returncode}:\n{procs.output(proc)}"
        ids = client.lrange(keys.consumers, 0, -1)
        subscribed = [client.hget(keys.info(item.decode()), "subscribed") for item in ids]
        return len(ids) == CONSUMERS and subscribed == [b"1"] * CONSUMERS

    try:
        wait_until(ready, 30, message="the daemon's consumers did not all join")
    finally:
        client.close()
    return proc


def start_publisher(
    procs: Any, cluster: LocalCluster, record: Path, duration_s: float, *flags: str
) -> Any:
    args = ["demo/publish.py", "--rate", str(RATE), "--target-duration-s", str(duration_s)]
    args += ["--record", str(record), "--batch-size", "50", "--progress-interval-s", "1", *flags]
    env = {"REDIS_URL": cluster.url, "REDIS_CLUSTER": "true", "PARTITIONS": str(PARTITIONS)}
    return procs.start(args, env=env)


def final_line(procs: Any, publisher: Any) -> str:
    """The publisher's summary: published, reached no subscriber, re-published, still unreceived."""
    output = procs.output(publisher)
    return next(line for line in output.splitlines() if line.startswith("published "))


def recorded(record: Path) -> tuple[set[str], set[str]]:
    """(every id published, the ids some PUBLISH of which reached a subscriber)."""
    published, received = set(), set()
    for line in record.read_text().splitlines():
        message_id, receivers = line.split()
        published.add(message_id)
        if int(receivers) > 0:
            received.add(message_id)
    return published, received


def streams(client: RedisCluster, keys: Keys) -> tuple[dict[int, Counter[str]], Counter[bytes]]:
    """The ids in each partition's output stream, and every dead letter's raw payload."""
    written: dict[int, Counter[str]] = {}
    dead: Counter[bytes] = Counter()
    for index, partition in enumerate(keys.partitions):
        entries = client.xrange(partition.output)
        written[index] = Counter(fields[b"message_id"].decode() for _, fields in entries)
        dead.update(fields[b"raw"] for _, fields in client.xrange(partition.dead))
    return written, dead


def written_ids(client: Any, keys: Keys) -> Counter[str]:
    """Every id in the partitions' output streams, with how often it is there."""
    written, _ = streams(client, keys)
    return sum(written.values(), Counter())


def publish_and_wait_written(
    procs: Any, env: dict[str, str], client: Any, keys: Keys, record: Path
) -> tuple[set[str], Counter[str]]:
    """``demo/publish.py`` for 1 s at 1,000 msg/s with ``env``; waits until every id it
    published is in the output streams; returns the ids published and those written."""
    publish = ["demo/publish.py", "--rate", "1000", "--target-duration-s", "1"]
    publisher = procs.start([*publish, "--record", str(record)], env=env)
    assert publisher.wait(timeout=60) == 0, procs.output(publisher)[-2000:]
    published = {line.split()[0] for line in record.read_text().splitlines()}
    wait_until(
        lambda: published <= written_ids(client, keys).keys(),
        30,
        message="not every published message was written",
    )
    return published, written_ids(client, keys)


def settle(client: RedisCluster, keys: Keys, want: set[str]) -> None:
    def done() -> bool:
        written, dead = streams(client, keys)
        ids = set().union(*(counter.keys() for counter in written.values()))
        return want <= ids and len(dead) >= len(INVALID_PAYLOADS)

    wait_for_result(done, 30)


def check_exactly_once(client: RedisCluster, keys: Keys, want: set[str]) -> None:
    written, dead = streams(client, keys)
    everything: Counter[str] = Counter()
    for index, counter in written.items():
        misplaced = [item for item in counter if partition_of(item, PARTITIONS) != index]
        assert not misplaced, f"partition {index} holds ids of others: {misplaced[:5]}"
        assert counter, f"partition {index} got nothing: the partitions do not spread"
        everything.update(counter)
    duplicates = {item: n for item, n in everything.items() if n > 1}
    missing = want - everything.keys()
    unknown = everything.keys() - want
    assert not duplicates, f"written twice: {list(duplicates.items())[:5]}"
    assert not missing, f"{len(missing)} of {len(want)} never written: {sorted(missing)[:5]}"
    assert not unknown, f"written but never published: {sorted(unknown)[:5]}"
    assert dead == Counter(INVALID_PAYLOADS.keys()), f"dead letters: {dead}"


def publish_invalid(client: RedisCluster, keys: Keys) -> None:
    for number, payload in enumerate(INVALID_PAYLOADS):
        channel = keys.partitions[number % PARTITIONS].channel
        assert client.spublish(channel, payload) == CONSUMERS


def stop_daemon(procs: Any, proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, procs.output(proc)[-3000:]


def test_everything_published_to_a_cluster_is_written_once_in_its_partition(
    cluster: LocalCluster, procs: Any, tmp_path: Path
) -> None:
    daemon = start_daemon(procs, cluster)
    keys = keys_for(cluster.url)
    client = RedisCluster.from_url(cluster.url)
    try:
        record = tmp_path / "published.txt"
        publisher = start_publisher(procs, cluster, record, 3.0)
        publish_invalid(client, keys)
        assert publisher.wait(timeout=60) == 0, procs.output(publisher)[-2000:]
        published, received = recorded(record)
        assert received == published, f"{len(published - received)} reached no subscriber"
        settle(client, keys, received)
        check_exactly_once(client, keys, received)

        status = command(cluster, "status")
        assert status.returncode == 0, status.stderr
        written, _ = streams(client, keys)
        for index, partition in enumerate(keys.partitions):
            assert f"{partition.output} {sum(written[index].values()):,}" in status.stdout
        assert f"written {len(received):,}" in status.stdout, status.stdout

        scaled = command(cluster, "scale", "1")
        assert scaled.returncode == 0, scaled.stderr
        wait_until(
            lambda: client.llen(keys.consumers) == 1,
            30,
            message="processor scale did not reach the daemon on the cluster",
        )
        stop_daemon(procs, daemon)
    finally:
        client.close()


def fail_over_while_publishing(
    cluster: LocalCluster,
    procs: Any,
    tmp_path: Path,
    key_of: Callable[[Keys], str],
    duration_s: float,
    restart_old_primary: bool = False,
    group_node_lives: bool = False,
) -> None:
    """Publishes with --retry-unreceived to a daemon with WAIT_REPLICAS=1, kill -9s the primary
    serving ``key_of(keys)`` mid-run (and starts it again, to rejoin as a replica, if asked),
    then checks that nothing published was lost or doubled and the daemon went on by itself.

    ``group_node_lives``: the group's own slot is elsewhere. A client made before the kill still
    reads the group's streams (XREAD, whose keys redis-py asks its first primary for), and the
    consumers beat on after the failover (while the cluster said CLUSTERDOWN they may have been
    declared dead and rejoined, as docs/cluster.md says)."""
    daemon = start_daemon(procs, cluster, WAIT_REPLICAS=1)
    keys = keys_for(cluster.url)
    client = RedisCluster.from_url(cluster.url)
    events = command_client(
        Settings(redis_url=cluster.url, redis_cluster=True, partitions=PARTITIONS), timeout_s=1
    )
    try:
        record = tmp_path / "published.txt"
        publisher = start_publisher(procs, cluster, record, duration_s, "--retry-unreceived")
        publish_invalid(client, keys)
        wait_until(lambda: record.exists() and record.stat().st_size > 100_000, 30)
        key = key_of(keys)
        primary = cluster.primary_of(key)
        assert (cluster.primary_of(keys.gaps) is not primary) == group_node_lives
        cluster.kill(primary)
        if group_node_lives:
            wait_until(lambda: reads(events, keys.gaps), 15, message="XREAD failed for good")
        promoted = cluster.wait_for_primary_change(key, primary, timeout_s=30)
        if restart_old_primary:
            primary.restart(keep_data=False)
            wait_until(
                lambda: role_of(primary) == b"slave", 30, message="old primary not a replica"
            )
        assert publisher.wait(timeout=90) == 0, procs.output(publisher)[-2000:]
        assert final_line(procs, publisher).endswith("still unreceived 0)")
        client.close()
        client = RedisCluster.from_url(promoted.url)
        published, received = recorded(record)
        assert received == published
        settle(client, keys, received)
        check_exactly_once(client, keys, received)
        assert daemon.poll() is None, procs.output(daemon)[-3000:]
        if group_node_lives:
            beating_on(client, keys)
        stop_daemon(procs, daemon)
    finally:
        client.close()
        events.close()


def beating_on(client: RedisCluster, keys: Keys) -> None:
    """The group is whole again and stays so for three heartbeat TTLs: the same consumers
    listed, each with its heartbeat key (one that stopped beating would lose it in one TTL)."""
    wait_until(lambda: client.llen(keys.consumers) == CONSUMERS, 30, message="group not whole")
    members = set(client.lrange(keys.consumers, 0, -1))
    until = time.monotonic() + 3 * HEARTBEAT_TTL_MS / 1000
    while time.monotonic() < until:
        assert set(client.lrange(keys.consumers, 0, -1)) == members, "the group changed"
        for member in members:
            assert client.exists(keys.heartbeat(member.decode())), f"{member!r} stopped beating"
        time.sleep(0.1)


def reads(client: redis.Redis, stream: str) -> bool:
    try:
        client.xread({stream: "0"}, count=1)
    except REDIS_ERRORS:
        return False
    return True


def test_a_killed_primary_fails_over_and_nothing_published_is_lost_or_doubled(
    cluster: LocalCluster, procs: Any, tmp_path: Path
) -> None:
    """Partition 0's primary also serves slot 0: redis-py's default node, which it asks for
    the keys of an XREAD (the heartbeat's read of the group's events)."""
    fail_over_while_publishing(
        cluster,
        procs,
        tmp_path,
        lambda keys: keys.partitions[0].channel,
        duration_s=8.0,
        group_node_lives=True,
    )


@pytest.mark.slow
def test_the_group_s_own_shard_fails_over_and_its_old_primary_returns_as_a_replica(
    cluster: LocalCluster, procs: Any, tmp_path: Path
) -> None:
    """The primary holding the group's bookkeeping (heartbeats, membership, control plane) is
    killed: every heartbeat fails until a replica is promoted. The old primary is then started
    again and rejoins as a replica; subscribers must not stay on it."""
    fail_over_while_publishing(
        cluster,
        procs,
        tmp_path,
        lambda keys: keys.consumers,
        duration_s=14.0,
        restart_old_primary=True,
    )


def role_of(node: Any) -> bytes:
    with redis.Redis.from_url(node.url) as direct:
        role: bytes = direct.execute_command("ROLE")[0]
        return role
