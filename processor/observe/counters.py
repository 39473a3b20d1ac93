"""The group's counters, summed over its partitions: what was written (written, dead, skipped)
and what consumers held unwritten when they exited (lost, left_to_takeover).

Each partition's write script counts into that partition's hash, in the same atomic step as the
appends, so those sums are exact; on a single Redis there is one hash. A consumer adds its
unwritten counts to the first partition's hash as it exits.
"""

from __future__ import annotations

from typing import Any

import redis

from processor.store.keys import Keys

COUNTERS = ("written", "dead", "skipped")
UNWRITTEN = ("lost", "left_to_takeover")


def read_counters(client: redis.Redis, keys: Keys) -> dict[str, int]:
    with client.pipeline(transaction=False) as pipe:
        for partition in keys.partitions:
            pipe.hmget(partition.stats, [*COUNTERS, *UNWRITTEN])
        replies: list[Any] = pipe.execute()
    return {
        name: sum(int(reply[index] or 0) for reply in replies)
        for index, name in enumerate((*COUNTERS, *UNWRITTEN))
    }


def record_unwritten(client: redis.Redis, keys: Keys, lost: int, left_to_takeover: int) -> None:
    """Adds what an exiting consumer held unwritten to the group's counters."""
    with client.pipeline(transaction=False) as pipe:
        for name, count in (("lost", lost), ("left_to_takeover", left_to_takeover)):
            if count:
                pipe.hincrby(keys.partitions[0].stats, name, count)
        pipe.execute()
