"""Partitions of the channel and the streams on a Redis Cluster: which one a message belongs
to, and the hash tag that puts each partition's keys on one slot.

A message's partition is ``crc32(message_id) mod PARTITIONS`` (a dead letter without a usable
``message_id`` goes by its dedup id, the payload's SHA-1). Every consumer computes it the same
way, so a message is deduplicated in one partition whoever writes it, and whichever channel it
arrived on. Partition p's hash tag is the first of ``p<p>``, ``p<p>.1``, ``p<p>.2``, ... whose
slot lies in the p-th of ``PARTITIONS`` equal ranges of the 16,384 slots: a cluster whose slots
are split evenly (as ``redis-cli --cluster create`` splits them) gets the partitions evenly.
"""

from __future__ import annotations

import itertools
import zlib
from functools import cache

from redis.crc import key_slot

HASH_SLOTS = 16_384
MAX_PARTITIONS = 1024


def partition_of(dedup_id: str, partitions: int) -> int:
    if partitions == 1:
        return 0
    return zlib.crc32(dedup_id.encode("utf-8", "surrogatepass")) % partitions


@cache
def hash_tag(partition: int, partitions: int) -> str:
    low = partition * HASH_SLOTS // partitions
    high = (partition + 1) * HASH_SLOTS // partitions
    for attempt in itertools.count():
        tag = f"p{partition}" if attempt == 0 else f"p{partition}.{attempt}"
        if low <= hash_slot(tag) < high:
            return tag
    raise AssertionError("unreachable")


def hash_slot(key: str) -> int:
    """Redis Cluster's hash slot of ``key`` (CRC16 of its hash tag, or of the whole key)."""
    return key_slot(key.encode())
