"""The local Redis Cluster the cluster tests run on: it forms, carries sharded Pub/Sub, and
fails a killed primary over to its replica (the facts the cluster mode is designed around)."""

from __future__ import annotations

import time

import redis

from tests.helpers import wait_until

CHANNEL = "messages:published:{p0}"


def test_a_local_cluster_carries_sharded_pub_sub_and_fails_a_killed_primary_over(cluster):
    client = redis.RedisCluster.from_url(cluster.url)
    pubsub = client.pubsub()
    try:
        pubsub.ssubscribe(CHANNEL)
        confirmed = []
        wait_until(
            lambda: confirmed.append(pubsub.get_sharded_message(timeout=0.1)) or confirmed[-1],
            10,
            message="no ssubscribe confirmation",
        )
        assert client.spublish(CHANNEL, b"before") == 1
        messages: list[dict] = []
        wait_until(
            lambda: (
                (message := pubsub.get_sharded_message(timeout=0.1))
                and messages.append(message) is None
            ),
            10,
            message="the sharded message never arrived",
        )
        assert messages[0]["data"] == b"before"

        primary = cluster.primary_of(CHANNEL)
        killed_at = time.monotonic()
        cluster.kill(primary)
        promoted = cluster.wait_for_primary_change(CHANNEL, primary, timeout_s=20)
        took = time.monotonic() - killed_at
        print(f"replica on port {promoted.port} promoted {took:.2f} s after the kill")
    finally:
        pubsub.close()
        client.close()
