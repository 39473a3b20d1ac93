"""The start-up check that every key the daemon writes holds what it writes there, or nothing.

A key of another type (another application's, or an old one under a name now given to a
setting) would fail every write to it with WRONGTYPE. At run time that is an outage the
consumers wait out, holding their messages; at start it is a wrong setting: one line naming the
key, its type and the setting, before any consumer starts.

Only the keys with fixed names are checked: the per-consumer keys (heartbeats, status hashes)
carry a fresh random id, and the dedup sets a time bucket, so no other application holds them
by accident.
"""

from __future__ import annotations

from typing import Any

import redis

from processor.errors import ConfigError, WrongType
from processor.observe.counters import read_counters
from processor.store.keys import Keys


def expected_types(keys: Keys) -> list[tuple[str, str, str]]:
    """(key, the type the daemon writes there, the setting that names it), for every key with
    a fixed name."""
    expected = [
        (keys.consumers, "list", "CONSUMERS_LIST"),
        (keys.departures, "stream", "KEY_PREFIX"),
        (keys.gaps, "stream", "KEY_PREFIX"),
        (keys.control, "hash", "KEY_PREFIX"),
        (keys.stop, "string", "KEY_PREFIX"),
        (keys.hosts, "zset", "KEY_PREFIX"),
        (keys.host_info, "hash", "KEY_PREFIX"),
        (keys.autoscale_lock, "string", "KEY_PREFIX"),
        (keys.group_stats, "hash", "KEY_PREFIX"),
    ]
    for partition in keys.partitions:
        expected += [
            (partition.output, "stream", "OUTPUT_STREAM"),
            (partition.dead, "stream", "DEAD_LETTER_STREAM"),
            (partition.stats, "hash", "KEY_PREFIX"),
            (partition.seen_clock, "string", "KEY_PREFIX"),
        ]
    unique: dict[str, tuple[str, str, str]] = {}
    for item in expected:
        unique.setdefault(item[0], item)
    return list(unique.values())


def check_key_types(client: redis.Redis, keys: Keys) -> None:
    """Raises ConfigError naming the first key that holds another type than the daemon writes.

    One TYPE per key; on a cluster the client routes each to its node.
    """
    expected = expected_types(keys)
    if keys.cluster:
        found: list[Any] = [client.type(key) for key, _, _ in expected]
    else:
        pipe = client.pipeline(transaction=False)
        for key, _, _ in expected:
            pipe.type(key)
        found = pipe.execute()
    for (key, kind, name), held in zip(expected, found, strict=True):
        held_text = held.decode() if isinstance(held, bytes) else str(held)
        if held_text not in (kind, "none"):
            raise ConfigError(
                f"invalid {name}: key {key!r} holds a {held_text} where the daemon writes a "
                f"{kind}; delete or rename that key, or set {name} to another name"
            )
    try:
        read_counters(client, keys)
    except WrongType as error:
        raise ConfigError(f"invalid KEY_PREFIX: {str(error).removeprefix('WRONGTYPE ')}") from None
