"""The check that every key the daemon writes holds what it writes there, or nothing.

A key of another type (another application's, or an old one under a name now given to a
setting) would fail every write to it with WRONGTYPE. At run time that is an outage the
consumers wait out, holding their messages; at start it is a wrong setting: one line naming the
key, its type and the setting, before any consumer starts. The one-shot commands name such a
key in the same words: ``processor status`` lists every one, ``dead-letters`` and ``replay``
the one that refused them (Redis's WRONGTYPE names no key).

Only the keys with fixed names are checked: the per-consumer keys (heartbeats, status hashes)
carry a fresh random id, and the dedup sets a time bucket, so no other application holds them
by accident.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from processor.errors import ConfigError, NotACount, WrongType
from processor.observe.counters import read_counters
from processor.store.connection import REDIS_ERRORS
from processor.store.keys import Keys


@dataclass(frozen=True)
class KeyType:
    """A key with a fixed name, the type written there, and the setting that names it."""

    key: str
    kind: str
    setting: str
    writer: str = "the daemon"

    def problem(self, held: str) -> str:
        """The one line saying that the key holds ``held`` instead."""
        return (
            f"invalid {self.setting}: key {self.key!r} holds a {held} where {self.writer} "
            f"writes a {self.kind}; delete or rename that key, or set {self.setting} to "
            "another name"
        )


def expected_types(keys: Keys) -> list[KeyType]:
    """Every key with a fixed name that the daemon writes."""
    expected = [
        KeyType(keys.consumers, "list", "CONSUMERS_LIST"),
        KeyType(keys.departures, "stream", "KEY_PREFIX"),
        KeyType(keys.gaps, "stream", "KEY_PREFIX"),
        KeyType(keys.control, "hash", "KEY_PREFIX"),
        KeyType(keys.stop, "string", "KEY_PREFIX"),
        KeyType(keys.hosts, "zset", "KEY_PREFIX"),
        KeyType(keys.host_info, "hash", "KEY_PREFIX"),
        KeyType(keys.autoscale_lock, "string", "KEY_PREFIX"),
        KeyType(keys.group_stats, "hash", "KEY_PREFIX"),
    ]
    for partition in keys.partitions:
        expected += [
            KeyType(partition.output, "stream", "OUTPUT_STREAM"),
            KeyType(partition.dead, "stream", "DEAD_LETTER_STREAM"),
            KeyType(partition.stats, "hash", "KEY_PREFIX"),
            KeyType(partition.seen_clock, "string", "KEY_PREFIX"),
        ]
    unique: dict[str, KeyType] = {}
    for item in expected:
        unique.setdefault(item.key, item)
    return list(unique.values())


def _only(keys: Keys, names: Collection[str]) -> list[KeyType]:
    return [item for item in expected_types(keys) if item.key in names]


def dead_letter_types(keys: Keys) -> list[KeyType]:
    """The keys ``processor dead-letters`` reads: the dead-letter streams."""
    return _only(keys, {partition.dead for partition in keys.partitions})


def replay_types(keys: Keys) -> list[KeyType]:
    """The keys ``processor replay`` reads or writes, its own replay records among them."""
    used = {keys.consumers}
    for partition in keys.partitions:
        used |= {partition.dead, partition.seen_clock}
    records = [
        KeyType(partition.replayed, "hash", "KEY_PREFIX", "processor replay")
        for partition in keys.partitions
    ]
    return _only(keys, used) + records


def wrong_types(
    client: redis.Redis, keys: Keys, expected: Sequence[KeyType] | None = None
) -> dict[str, str]:
    """Each key of ``expected`` (by default every key the daemon writes) that holds another
    type, with the line saying so.

    One TYPE per key; on a cluster the client routes each to its node.
    """
    expected = expected_types(keys) if expected is None else expected
    found: list[Any]
    if keys.cluster:
        found = [client.type(item.key) for item in expected]
    else:
        pipe = client.pipeline(transaction=False)
        for item in expected:
            pipe.type(item.key)
        found = pipe.execute()
    problems = {}
    for item, held in zip(expected, found, strict=True):
        other = _another_type(held, item.kind)
        if other is not None:
            problems[item.key] = item.problem(other)
    return problems


def _another_type(held: Any, kind: str) -> str | None:
    """The type TYPE replied, when the key holds another than ``kind`` (none is no key)."""
    held_text = held.decode() if isinstance(held, bytes) else str(held)
    return None if held_text in (kind, "none") else held_text


def check_key_types(client: redis.Redis, keys: Keys) -> None:
    """Raises ConfigError naming the first key that holds another type than the daemon writes."""
    problems = list(wrong_types(client, keys).values())
    if problems:
        raise ConfigError(problems[0])
    try:
        read_counters(client, keys)
    except NotACount as error:
        raise ConfigError(error.problem()) from None


@contextlib.contextmanager
def named_wrong_type(
    client: redis.Redis, keys: Keys, expected: Sequence[KeyType]
) -> Iterator[None]:
    """Raises a WRONGTYPE refusal from the block as the ConfigError naming the key of
    ``expected`` that holds another type, in the start-up check's words: Redis's own reply
    names no key (in a script, only the script's line)."""
    try:
        yield
    except WrongType as error:
        problems = list(wrong_types(client, keys, expected).values())
        if problems:
            raise ConfigError(problems[0]) from None
        raise ConfigError(
            f"a key held another type than expected ({error}); none does now: try again"
        ) from None


# A WRONGTYPE our own scripts raise names its key: "<key> holds ..." or "<key> field ..." (the
# reply's first word, WRONGTYPE, is the error's status_code).
_NAMED = re.compile(r"^\S+ (holds|field) ")


def name_wrong_key(
    error: WrongType, client: redis.Redis, expected: Sequence[tuple[str, str | None]], where: str
) -> WrongType:
    """``error`` naming the key that refused it: Redis's WRONGTYPE names none (in a script, only
    the script's line). ``expected`` pairs each key the call used with the type the daemon
    keeps there (None: not checked, a prefix). The first that holds another type is named, in
    the words the write script uses; when none does (a key built inside a script, or one
    deleted since), ``where`` is added to Redis's words."""
    if _NAMED.match(str(error)):
        return error
    checked = [(key, kind) for key, kind in expected if kind is not None]
    try:
        found = [client.type(key) for key, _ in checked]
    except REDIS_ERRORS:
        return error
    for (key, kind), held in zip(checked, found, strict=True):
        other = _another_type(held, kind)
        if other is not None:
            return WrongType(
                f"{key} holds a {other} where the daemon keeps a {kind} ({where}): "
                "delete or rename that key",
                status_code=error.status_code,
            )
    return WrongType(f"{str(error).rstrip('.')} ({where})", status_code=error.status_code)
