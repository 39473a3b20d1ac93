"""Partitions on a cluster: the rule that picks one per message, the hash tags that spread them
over the slots, and the key layout (one slot per partition, one for the group)."""

from __future__ import annotations

import zlib

import pytest
from redis.crc import key_slot

from processor.config import Settings
from processor.errors import ConfigError
from processor.loading import load_daemon_settings, load_publisher_settings
from processor.store.keys import Keys, channels
from processor.store.partitions import HASH_SLOTS, hash_tag, partition_of


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_a_message_s_partition_is_the_crc32_of_its_id_modulo_the_partition_count():
    for message_id in ("a", "order-17", "3f2c0d1e-1b2a-4c5d-9e8f-0a1b2c3d4e5f", "ü"):
        assert partition_of(message_id, 6) == zlib.crc32(message_id.encode()) % 6
        assert partition_of(message_id, 1) == 0


@pytest.mark.parametrize("partitions", [1, 2, 3, 6, 7, 16])
def test_partition_tags_fall_in_equal_slot_ranges_in_order(partitions):
    for p in range(partitions):
        tag_slot = key_slot(hash_tag(p, partitions).encode())
        assert p * HASH_SLOTS // partitions <= tag_slot < (p + 1) * HASH_SLOTS // partitions


def test_each_partition_s_keys_share_one_slot_and_the_group_s_keys_another():
    keys = Keys.from_settings(Settings(redis_cluster=True, partitions=3))
    group = {
        slot(name)
        for name in (
            keys.consumers,
            keys.heartbeat("x"),
            keys.info("x"),
            keys.gaps,
            keys.departures,
            keys.control,
            keys.stop,
            keys.hosts,
            keys.host_info,
            keys.autoscale_lock,
            keys.group_stats,
        )
    }
    assert len(group) == 1
    partition_slots = []
    for index, partition in enumerate(keys.partitions):
        names = [
            partition.channel,
            partition.output,
            partition.dead,
            partition.stats,
            partition.seen_prefix + "123",
            partition.seen_clock,
            keys.fence(index, "consumer-1"),
        ]
        assert len({slot(name) for name in names}) == 1, names
        partition_slots.append(slot(partition.output))
    assert len(set(partition_slots)) == 3
    assert keys.partitions[0].output == "messages:processed:{" + hash_tag(0, 3) + "}"
    assert channels(Settings(redis_cluster=True, partitions=3)) == [
        partition.channel for partition in keys.partitions
    ]


def test_on_a_single_redis_the_names_are_the_configured_ones_and_the_heartbeat_is_the_fence():
    keys = Keys.from_settings(Settings())
    assert (keys.channel, keys.output, keys.dead) == (
        "messages:published",
        "messages:processed",
        "messages:dead",
    )
    assert keys.consumers == "consumer:ids"
    assert keys.fence(0, "c") == keys.heartbeat("c") == "processor:heartbeat:c"
    assert keys.fences("c") == []


def test_names_of_one_partition_are_refused_when_there_are_several():
    keys = Keys.from_settings(Settings(redis_cluster=True, partitions=2))
    with pytest.raises(ValueError, match="2 partitions"):
        _ = keys.output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--partitions", "3"], "invalid PARTITIONS: 3 partitions spread the load"),
        (["--redis-cluster", "--partitions", "2000"], "invalid PARTITIONS: 2000 is more than"),
        (["--partitions", "0"], "PARTITIONS"),
        (
            ["--redis-cluster", "--redis-url", "unix:///tmp/redis.sock"],
            "invalid REDIS_URL: unix:///tmp/redis.sock is a unix socket",
        ),
        (["--redis-cluster", "--key-prefix", "{app}"], "invalid KEY_PREFIX: '{app}' has a hash"),
        (["--redis-cluster", "--consumers-list", "ids{x}"], "invalid CONSUMERS_LIST"),
        (["--redis-cluster", "--output-stream", "out:{a}"], "invalid OUTPUT_STREAM"),
        (["--redis-cluster", "--dead-letter-stream", "dead}"], "invalid DEAD_LETTER_STREAM"),
        (["--redis-cluster", "--input-channel", "in:{a}"], "invalid INPUT_CHANNEL"),
        (["--wait-replicas", "-1"], "WAIT_REPLICAS"),
    ],
)
def test_cluster_settings_that_cannot_work_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_daemon_settings(argv, environ={})


def test_the_publisher_takes_the_cluster_settings_from_the_environment():
    settings = load_publisher_settings([], environ={"REDIS_CLUSTER": "true", "PARTITIONS": "4"})
    assert (settings.redis_cluster, settings.partitions) == (True, 4)
    with pytest.raises(ConfigError, match="REDIS_CLUSTER"):
        load_publisher_settings([], environ={"PARTITIONS": "4"})
    with pytest.raises(ConfigError, match="invalid INPUT_CHANNEL"):
        load_publisher_settings([], environ={"REDIS_CLUSTER": "1", "INPUT_CHANNEL": "a{b}"})
