"""The cluster mode's parts on a real local cluster: a reader follows its channel's slot to a
new primary even when its connection survives the failover, and a batch spanning partitions is
written once, each entry in its own partition, with the takeover's seen check asking the same
partition."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from demo.redis_cluster import LocalCluster
from processor.config import Settings
from processor.connection import command_client
from processor.dedup import SeenCheck, Window
from processor.keys import Keys
from processor.messages import Entry, dead_letter
from processor.subscriber import Gap, Subscribers
from processor.writer import Writer
from tests.helpers import wait_until

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
    writer = Writer(cluster_client, keys, 60_000, 0.2, lambda: "[t]", threading.Event(), 1.0)
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
        assert all(keys.partition_of(dead_letter("", raw, 1000).lock_id) == index for raw in dead)
    seen = SeenCheck(cluster_client, keys, Window.for_ttl(60_000))
    assert seen.seen([entry.lock_id for entry in entries] + ["never-written"]) == [True] * 64 + [
        False
    ]


def test_a_write_with_a_stale_fence_is_refused_in_every_partition(
    settings: Settings, cluster_client: redis.Redis
) -> None:
    keys = Keys.from_settings(settings)
    writer = Writer(cluster_client, keys, 60_000, 0.2, lambda: "[t]", threading.Event(), 1.0)
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
        settings, keys, received.extend, gaps.append, lambda: "[t]", 0.2, lambda n, e: None
    )
    readers.start()
    publisher = RedisCluster.from_url(module_cluster.url)
    try:
        assert readers.wait_subscribed(10)
        channel = keys.partitions[0].channel
        old = module_cluster.primary_of(channel)
        replica = next(
            node
            for node in module_cluster.nodes
            if node is not old and _replica_of(node) == old.port
        )
        with redis.Redis.from_url(replica.url) as direct:
            direct.execute_command("CLUSTER", "FAILOVER")
        module_cluster.wait_for_primary_change(channel, old, timeout_s=20)
        publisher.nodes_manager.initialize()

        def delivered() -> bool:
            return publisher.spublish(channel, b"after") == 1 and b"after" in received

        wait_until(delivered, 20, interval=0.2, message="the reader stayed on the old primary")
        assert gaps, "the move was not recorded as a gap"
    finally:
        readers.stop()
        readers.join(5)
        publisher.close()


def _replica_of(node: object) -> int | None:
    with redis.Redis.from_url(node.url) as direct:  # type: ignore[attr-defined]
        role = direct.execute_command("ROLE")
    return int(role[2]) if role[0] == b"slave" else None
