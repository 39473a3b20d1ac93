"""The cluster mode's parts on a real local cluster: a reader follows its channel's slot to a
new primary even when its connection survives the failover, and a batch spanning partitions is
written once, each entry in its own partition, with the takeover's seen check asking the same
partition."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from demo.redis_cluster import LocalCluster
from processor.config import MAX_BATCH_SIZE, Settings
from processor.consumer.dedup import SeenCheck, Window
from processor.consumer.messages import Entry, dead_letter
from processor.consumer.subscriber import Gap
from processor.consumer.subscribers import Subscribers
from processor.consumer.writer import Writer
from processor.errors import ConfigError
from processor.group.controlplane import claim_partitions
from processor.group.steering import Steering
from processor.loading import load_daemon_settings
from processor.store.access import CLUSTER_ACL_RULES
from processor.store.connection import command_client, reread_layout
from processor.store.keys import Keys
from tests.conftest import REPO_ROOT, Processes
from tests.faults_support import FAST_SETTINGS
from tests.helpers import tagged, wait_until
from tests.test_access import refused_at_start
from tests.test_cluster import publish_and_wait_written

PARTITIONS = 3


@pytest.fixture
def settings(module_cluster: LocalCluster) -> Settings:
    return Settings(redis_url=module_cluster.url, redis_cluster=True, partitions=PARTITIONS)


@pytest.fixture
def cluster_client(settings: Settings) -> Iterator[redis.Redis]:
    client = command_client(settings, name="test-cluster-parts")
    try:
        yield client
    finally:
        client.close()


def _entries(keys: Keys, count: int) -> list[Entry]:
    entries = [Entry("o", f"id-{n}", f'{{"message_id": "id-{n}"}}') for n in range(count)]
    entries += [dead_letter("invalid JSON", f"raw-{n}".encode(), 1000) for n in range(4)]
    return entries


def test_a_batch_over_partitions_is_written_once_each_entry_in_its_own_partition(
    settings: Settings, cluster_client: redis.Redis
) -> None:
    keys = Keys.from_settings(settings)
    writer = Writer(cluster_client, keys, 60_000, 0.2, tagged("[t]"), threading.Event(), 1.0)
    entries = _entries(keys, 60)
    first = writer.write(entries, "consumer-a", "")
    assert first is not None
    assert (first.written, first.dead, first.skipped) == (60, 4, 0)
    assert first.dead_flags == "1111"
    again = writer.write(list(reversed(entries)), "consumer-b", "")
    assert again is not None
    assert (again.written, again.dead, again.skipped, again.dead_flags) == (0, 0, 64, "0000")

    for index, partition in enumerate(keys.partitions):
        ids = [
            fields[b"message_id"].decode() for _, fields in cluster_client.xrange(partition.output)
        ]
        dead = [fields[b"raw"] for _, fields in cluster_client.xrange(partition.dead)]
        assert all(keys.partition_of(item) == index for item in ids)
        assert ids, f"partition {index} got none of 60 ids"
        assert all(keys.partition_of(dead_letter("", raw, 1000).dedup_id) == index for raw in dead)
    seen = SeenCheck(cluster_client, keys, Window.for_ttl(60_000))
    assert seen.seen([entry.dedup_id for entry in entries] + ["never-written"]) == [True] * 64 + [
        False
    ]


def test_ids_crowding_into_one_partition_are_written_in_calls_the_script_can_take(
    settings: Settings, cluster_client: redis.Redis
) -> None:
    # A batch holds PROCESSING_BATCH_SIZE per partition on average only: a publisher's ids can
    # all land in one partition, beyond what one script call unpacks.
    keys = Keys.from_settings(settings)
    writer = Writer(cluster_client, keys, 60_000, 0.2, tagged("[t]"), threading.Event(), 1.0)
    crowded = (f"crowd-{n}" for n in range(100_000))
    ids = [item for item in crowded if keys.partition_of(item) == 1][: MAX_BATCH_SIZE * 2 + 10]
    entries = [Entry("o", item, "{}") for item in ids]
    result = writer.write(entries, "consumer-c", "")
    assert result is not None and (result.written, result.skipped) == (len(ids), 0)
    written = [
        fields[b"message_id"].decode()
        for _, fields in cluster_client.xrange(keys.partitions[1].output)
        if fields[b"message_id"].startswith(b"crowd-")
    ]
    assert written == ids
    seen = SeenCheck(cluster_client, keys, Window.for_ttl(60_000))
    assert seen.seen([*ids, "crowd-never"]) == [True] * len(ids) + [False]


def test_a_write_with_a_stale_fence_is_refused_in_every_partition(
    settings: Settings, cluster_client: redis.Redis
) -> None:
    keys = Keys.from_settings(settings)
    writer = Writer(cluster_client, keys, 60_000, 0.2, tagged("[t]"), threading.Event(), 1.0)
    for fence in keys.fences("consumer-f"):
        cluster_client.set(fence, "token-1", px=10_000)
    written = writer.write([Entry("o", "fenced-1", "{}")], "consumer-f", "token-1")
    assert written is not None and written.written == 1
    refused = writer.write([Entry("o", "fenced-2", "{}")], "consumer-f", "token-0")
    assert refused is not None and refused.fenced


def test_a_reader_follows_its_slot_to_the_new_primary_after_a_manual_failover(
    module_cluster: LocalCluster, settings: Settings
) -> None:
    """CLUSTER FAILOVER demotes the old primary without closing its clients' connections."""
    keys = Keys.from_settings(settings)
    received: list[bytes] = []
    gaps: list[Gap] = []
    readers = Subscribers(
        settings, keys, received.extend, gaps.append, tagged("[t]"), 0.2, lambda n, e: None
    )
    readers.start()
    publisher = RedisCluster.from_url(module_cluster.url)
    try:
        assert readers.wait_subscribed(10)
        channel = keys.partitions[0].channel
        module_cluster.fail_over(channel, timeout_s=30)

        def delivered() -> bool:
            # As processor publish does: a 0 re-reads the layout, since the node asked first
            # may not have heard of the failover yet (the old primary takes SPUBLISH and says 0).
            receivers = publisher.spublish(channel, b"after")
            if receivers == 0:
                reread_layout(publisher)
            return receivers == 1 and b"after" in received

        wait_until(delivered, 20, interval=0.2, message="the reader stayed on the old primary")
        assert gaps, "the move was not recorded as a gap"
    finally:
        readers.stop()
        readers.join(5)
        publisher.close()


def test_a_cluster_node_without_redis_cluster_is_a_config_error(
    module_cluster: LocalCluster, procs: Processes
) -> None:
    line = refused_at_start(procs, module_cluster.url, secret="none")
    assert "invalid REDIS_CLUSTER" in line and "set REDIS_CLUSTER=true" in line, line


def test_a_daemon_with_other_partitions_than_the_live_group_is_refused(
    module_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    def keys_with(partitions: int) -> Keys:
        settings = Settings(
            redis_url=module_cluster.url,
            redis_cluster=True,
            partitions=partitions,
            key_prefix="claim-test",
        )
        return Keys.from_settings(settings)

    client = command_client(Settings(redis_url=module_cluster.url, redis_cluster=True))
    try:
        keys = keys_with(3)
        claim_partitions(client, keys, 3)
        claim_partitions(client, keys, 3)
        client.zadd(keys.hosts, {"host-a": int(time.time() * 1000) + 60_000})
        with pytest.raises(ConfigError, match="PARTITIONS: 6, but the live group runs with 3"):
            claim_partitions(client, keys_with(6), 6)
        client.zrem(keys.hosts, "host-a")
        with caplog.at_level("WARNING", logger="processor.group.controlplane"):
            claim_partitions(client, keys_with(6), 6)
        assert "PARTITIONS changed from 3 to 6" in caplog.text
        assert client.hget(keys.control, "partitions") == b"6"
    finally:
        client.close()


def test_the_documented_cluster_user_runs_the_daemon_the_publisher_and_status(
    module_cluster: LocalCluster, procs: Processes, tmp_path: Path
) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert CLUSTER_ACL_RULES in " ".join(readme.split()), "README's cluster ACL line differs"
    for node in module_cluster.nodes:
        with redis.Redis.from_url(node.url) as direct:
            direct.execute_command(
                "ACL", "SETUSER", "processor", "on", ">c-pass", *CLUSTER_ACL_RULES.split()
            )
    url = module_cluster.url.replace("redis://", "redis://processor:c-pass@", 1)
    env = {
        **FAST_SETTINGS,
        "REDIS_URL": url,
        "REDIS_CLUSTER": "true",
        "PARTITIONS": str(PARTITIONS),
        "CONSUMERS_COUNT": "1",
        "KEY_PREFIX": "processor",
        "OUTPUT_STREAM": "messages:processed:acl",
        "DEAD_LETTER_STREAM": "messages:dead:acl",
        "INPUT_CHANNEL": "messages:published:acl",
        "CONSUMERS_LIST": "consumer:ids:acl",
        "WAIT_REPLICAS": "1",
    }
    keys = Keys.from_settings(load_daemon_settings([], environ=env))
    daemon = procs.start(["demo/consume.py"], env=env)
    client = RedisCluster.from_url(module_cluster.url)
    try:
        wait_until(
            lambda: client.llen(keys.consumers) == 1,
            30,
            message=lambda: (
                f"the daemon did not start as the ACL user:\n{procs.output(daemon)[-3000:]}"
            ),
        )
        record = tmp_path / "record.txt"
        published, written = publish_and_wait_written(procs, env, client, keys, record)
        assert set(written) == published, "written but never published"
        status = subprocess.run(
            [sys.executable, "-m", "processor", "status"],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        for partition in keys.partitions:
            length = client.xlen(partition.output)
            assert f"{partition.output} {length:,}" in status.stdout, status.stdout
        assert "NOPERM" not in procs.output(daemon), procs.output(daemon)[-3000:]
    finally:
        client.close()


def test_idle_stop_on_a_cluster_counts_the_writes_of_every_partition(
    module_cluster: LocalCluster, cluster_client: redis.Redis
) -> None:
    """A host whose consumers receive nothing (it runs none) must not stop while the group
    writes: on a cluster the write counters live in the partitions' slots."""
    settings = Settings(
        redis_url=module_cluster.url,
        redis_cluster=True,
        partitions=PARTITIONS,
        key_prefix="idle-test",
        host_id="host-idle",
        idle_stop_s=5.0,
        heartbeat_ttl_ms=300,
        heartbeat_interval_ms=100,
    )
    keys = Keys.from_settings(settings)
    steering = Steering(settings, cluster_client, keys)
    t0 = time.monotonic() + 3600  # beats are due by the time given, well after the start
    steering.start(0, threading.Event())
    try:
        assert not steering.tick(0, 0, now=t0 + 10.0).stopping
        for second, partition in ((14.0, 1), (18.0, 2)):
            cluster_client.hincrby(keys.partitions[partition].stats, "written", 5)
            assert not steering.tick(0, 0, now=t0 + second).stopping  # the group wrote: active
        assert not steering.tick(0, 0, now=t0 + 22.0).stopping
        assert "idle" in steering.tick(0, 0, now=t0 + 23.5).stop_reason
    finally:
        steering.leave()
