"""The group's counters, summed over its partitions: what was written (written, dead, skipped)
and what consumers held unwritten when they exited (lost, left_to_takeover).

Each partition's write script counts into that partition's hash, in the same atomic step as the
appends, so those sums are exact; on a single Redis there is one hash. A consumer adds its
unwritten counts to the first partition's hash as it exits.
"""

from __future__ import annotations

import re
from typing import Any

import redis

from processor.errors import NotACount
from processor.store.keys import Keys

COUNTERS = ("written", "dead", "skipped")
_INTEGER = re.compile(r"0|-?[1-9][0-9]*")
UNWRITTEN = ("lost", "left_to_takeover")


def read_counters(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """The sums; NotACount naming the hash and field when one holds no integer."""
    with client.pipeline(transaction=False) as pipe:
        for partition in keys.partitions:
            pipe.hmget(partition.stats, [*COUNTERS, *UNWRITTEN])
        replies: list[Any] = pipe.execute()
    names = (*COUNTERS, *UNWRITTEN)
    totals = dict.fromkeys(names, 0)
    for partition, reply in zip(keys.partitions, replies, strict=True):
        for name, value in zip(names, reply, strict=True):
            totals[name] += counter_value(partition.stats, name, value)
    return totals


def counter_value(key: str, name: str, value: bytes | str | None) -> int:
    """A counter's value (0 when unset), or NotACount naming it: an operator's HSET of a word
    would otherwise end whatever reads it. The write script's rule, HINCRBY's: digits with an
    optional minus, no leading zero, room to grow."""
    if value is None:
        return 0
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if _INTEGER.fullmatch(text) and len(text) < 19:
        return int(text)
    raise NotACount(
        f"WRONGTYPE {key} field {name} holds {text[:40]!r} where the daemon counts an "
        "integer: delete that field"
    )


def record_unwritten(client: redis.Redis, keys: Keys, lost: int, left_to_takeover: int) -> None:
    """Adds what an exiting consumer held unwritten to the group's counters."""
    with client.pipeline(transaction=False) as pipe:
        for name, count in (("lost", lost), ("left_to_takeover", left_to_takeover)):
            if count:
                pipe.hincrby(keys.partitions[0].stats, name, count)
        pipe.execute()
