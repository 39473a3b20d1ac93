"""How the group remembers which ids it has written: fixed-size digests in time-bucketed sets.

Each written id (a ``message_id``, or a payload's SHA-1 for a dead letter without one) is kept
as a 12-byte BLAKE2b digest, whatever the id's length, in the set of the time bucket (by Redis's
clock) it was written in, each bucket ``DEDUP_WINDOW_MS / BUCKETS_CHECKED`` wide. A write
checks the current bucket and the ``BUCKETS_CHECKED`` before it, one ``SMISMEMBER`` each per
batch, so an id is remembered for between ``DEDUP_WINDOW_MS`` and 1.5 x ``DEDUP_WINDOW_MS``; the
set of a bucket no longer checked is unlinked by the next write (and expires soon after in any
case). The bucket never goes back while Redis's clock steps back by up to 1.5 x
``DEDUP_WINDOW_MS`` (``Keys.seen_clock``, see ``lua/bucket.lua``, shared by both scripts).
With 96-bit digests, two different ids collide with a probability of about n^2 / 2^97 for n ids
in a window: 2e-14 for 60 million.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.cluster import RedisCluster

from processor.store.keys import Keys
from processor.store.scripts import Script

log = logging.getLogger(__name__)

# Two earlier buckets: each id is looked up in three sets per batch, and kept for at most 1.5 x
# the window. Measured (demo/write_bench.py): one or four earlier buckets cost about the same
# per new message; more buckets cost more when most of a batch is already written (takeovers,
# the race strategy), fewer keep ids longer.
BUCKETS_CHECKED = 2
DIGEST_BYTES = 12


def digest(dedup_id: str) -> bytes:
    return hashlib.blake2b(
        dedup_id.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES
    ).digest()


@dataclass(frozen=True)
class Window:
    """The dedup window as the scripts take it: bucket width and buckets checked."""

    width_ms: int
    buckets_checked: int = BUCKETS_CHECKED

    @classmethod
    def for_ttl(cls, dedup_window_ms: int) -> Window:
        return cls(width_ms=-(-dedup_window_ms // BUCKETS_CHECKED))


class SeenCheck:
    """Which ids are already written, without writing (the takeover's pre-check)."""

    def __init__(self, client: redis.Redis, keys: Keys, window: Window) -> None:
        self._keys = keys
        self._window = window
        self._script = Script(client, "seen.lua", ("string",))

    def seen(self, dedup_ids: list[str]) -> list[bool]:
        flags = [False] * len(dedup_ids)
        for partition, indices in self._keys.script_calls(dedup_ids):
            found = self._seen_in(partition, [dedup_ids[index] for index in indices])
            for index, flag in zip(indices, found, strict=True):
                flags[index] = flag
        return flags

    def _seen_in(self, partition: int, dedup_ids: list[str]) -> list[bool]:
        window = self._window
        part = self._keys.partitions[partition]
        args: list[str | bytes | int] = [
            part.seen_prefix,
            window.width_ms,
            window.buckets_checked,
            *(digest(dedup_id) for dedup_id in dedup_ids),
        ]
        reply = self._script(keys=[part.seen_clock], args=args)
        return [int(flag) == 1 for flag in reply]


def evicting_policies(info: dict[str, Any]) -> set[str]:
    """The ``maxmemory-policy`` that evicts keys, in ``INFO memory`` of one Redis or of each of
    a cluster's primaries (redis-py's cluster client answers by node): any but noeviction, on
    a node with a ``maxmemory`` (without one, nothing is evicted)."""
    nodes = [info] if "maxmemory_policy" in info else list(info.values())
    return {
        str(node["maxmemory_policy"])
        for node in nodes
        if isinstance(node, dict)
        and node.get("maxmemory_policy", "noeviction") != "noeviction"
        and int(node.get("maxmemory", 0)) > 0
    }


def warn_if_evicting(client: redis.Redis, cluster: bool) -> None:
    """Warns when Redis may evict our keys under memory pressure: the dedup sets carry an
    expiry, so a volatile-* policy evicts them first (their ids would be written again), and an
    allkeys-* policy may evict the output streams too. With noeviction a full Redis refuses
    writes instead, and the daemon holds them until it has room."""
    try:
        if cluster:
            primaries = RedisCluster.PRIMARIES
            info = cast(RedisCluster, client).info("memory", target_nodes=primaries)
        else:
            info = client.info("memory")
        evicting = sorted(evicting_policies(info))
    except redis.exceptions.NoPermissionError:
        log.debug("INFO not permitted: Redis's maxmemory-policy not checked")
        return
    if evicting:
        log.warning(
            "Redis's maxmemory-policy is %s: when memory runs out it evicts keys, and the "
            "dedup window (ids written again) or the output streams can go; set "
            "maxmemory-policy noeviction",
            ", ".join(evicting),
        )
