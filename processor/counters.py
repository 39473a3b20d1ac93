"""The group's write counters (written, dead, skipped), summed over its partitions.

Each partition's write script counts into that partition's hash, in the same atomic step as the
appends, so the sums are exact; on a single Redis there is one hash.
"""

from __future__ import annotations

from typing import Any

import redis

from processor.keys import Keys

COUNTERS = ("written", "dead", "skipped")


def read_counters(client: redis.Redis, keys: Keys) -> dict[str, int]:
    with client.pipeline(transaction=False) as pipe:
        for partition in keys.partitions:
            pipe.hmget(partition.stats, list(COUNTERS))
        replies: list[Any] = pipe.execute()
    return {
        name: sum(int(reply[index] or 0) for reply in replies)
        for index, name in enumerate(COUNTERS)
    }
