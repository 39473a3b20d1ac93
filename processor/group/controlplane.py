"""The control plane in Redis: the group's desired size, the stop key and the host registry.

Keys, under ``KEY_PREFIX``:

- ``<prefix>:control`` (hash): ``desired`` (the whole group's size, set by ``processor scale`` or
  the autoscaler), ``desired_by`` and ``desired_at_ms`` (who set it, when), ``autoscale`` (the
  last autoscale decision, for ``processor status``);
- ``<prefix>:stop``: present while the group is asked to stop (``processor stop``); its value
  says who asked and when;
- ``<prefix>:hosts`` (sorted set: host id, expiry in ms by Redis's clock) and
  ``<prefix>:host-info`` (hash: host id -> what it reports, as JSON): the live hosts, each
  refreshed by its daemon's beat (``lua/host_beat.lua``).

This module reads and writes those keys; what a daemon does with them is ``steering.py``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis

from processor.errors import ConfigError
from processor.store.keys import Keys
from processor.store.scripts import Script

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostInfo:
    """What a host reports with each beat."""

    host_id: str
    instance: str = ""
    pid: int = 0
    max_consumers: int = 0
    running: int = 0
    share: int | None = None  # None: no desired size, the host runs CONSUMERS_COUNT
    shortfall: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "instance": self.instance,
                "pid": self.pid,
                "max": self.max_consumers,
                "running": self.running,
                "share": self.share,
                "shortfall": self.shortfall,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, host_id: str, text: str) -> HostInfo:
        """What a host reported; anything unreadable (another version, a hand edit) as unset."""
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        share = _whole(data.get("share"))
        return cls(
            host_id,
            str(data.get("instance", "")),
            _whole(data.get("pid")) or 0,
            _whole(data.get("max")) or 0,
            _whole(data.get("running")) or 0,
            share,
            _whole(data.get("shortfall")) or 0,
        )


@dataclass(frozen=True)
class Control:
    """The group's control values."""

    desired: int | None = None
    desired_by: str = ""
    desired_at_ms: int = 0
    autoscale: str = ""  # the last autoscale decision
    stop: str = ""  # who asked the group to stop; "" when nobody did
    cleared_by: str = ""  # who removed the desired size (processor scale --clear)
    invalid: str = ""  # a desired value that is not a whole number >= 1, as found


@dataclass(frozen=True)
class Beat:
    """What one host beat returned."""

    claimed: bool
    rejoined: bool  # we were not registered before this beat (expired: outage, restart)
    now_ms: int
    control: Control
    activity: int  # the group's written + dead + skipped: changes whenever anything is written
    hosts: dict[str, HostInfo]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _whole(value: Any) -> int | None:
    """A non-negative whole number, or None for anything else."""
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def parse_control(fields: dict[str, str], stop: str) -> Control:
    """The control hash; a desired size that is not a whole number >= 1 counts as unset (and
    is logged by the caller), so a bad hand edit never stops the daemons' loops."""
    desired = _whole(fields.get("desired"))
    return Control(
        desired if desired else None,
        fields.get("desired_by", ""),
        _whole(fields.get("desired_at_ms")) or 0,
        fields.get("autoscale", ""),
        stop,
        fields.get("cleared_by", ""),
        "" if desired or "desired" not in fields else fields["desired"],
    )


def claim_partitions(client: redis.Redis, keys: Keys, partitions: int) -> None:
    """Records PARTITIONS for the group, or refuses one that differs from the live group's
    (ConfigError). A count changed while the whole group is stopped is taken, with a warning:
    ids written under the old layout are not remembered by the new one."""
    script = Script(client, "claim_partitions.lua", ("hash", "zset"))
    accepted, before = script(keys=[keys.control, keys.hosts], args=[partitions])
    recorded = _text(before)
    if not int(accepted):
        raise ConfigError(
            f"invalid PARTITIONS: {partitions}, but the live group runs with {recorded}; "
            "stop every daemon ('processor stop') to change it"
        )
    if recorded and recorded != str(partitions):
        log.warning(
            "PARTITIONS changed from %s to %d: a message written in the last DEDUP_WINDOW_MS under "
            "the old layout is not remembered by the new one (publish nothing old again)",
            recorded,
            partitions,
        )


def who(command: str) -> str:
    """``command`` with where it ran, for ``desired_by`` and the stop key."""
    return f"{command} (host {socket.gethostname()}, pid {os.getpid()})"


class HostRegistry:
    """This daemon's registration as a host, and its view of the control plane."""

    def __init__(self, client: redis.Redis, keys: Keys, host_id: str, ttl_ms: int) -> None:
        self._keys = keys
        self._host_id = host_id
        self._ttl_ms = ttl_ms
        self._client = client
        self._script = Script(client, "host_beat.lua", ("zset", "hash", "hash", "string", "hash"))
        self._leave = Script(client, "host_leave.lua", ("zset", "hash"))

    def beat(self, info: HostInfo, claim: bool = False) -> Beat:
        keys = self._keys
        reply: Any = self._script(
            keys=[keys.hosts, keys.host_info, keys.control, keys.stop, keys.group_stats],
            args=[self._host_id, self._ttl_ms, info.to_json(), info.instance, int(claim)],
        )
        now_ms, claimed, control, stop, written, dead, skipped, hosts, rejoined = reply
        fields = {_text(control[i]): _text(control[i + 1]) for i in range(0, len(control), 2)}
        return Beat(
            claimed=int(claimed) == 1,
            rejoined=int(rejoined) == 1,
            now_ms=int(now_ms),
            control=parse_control(fields, _text(stop)),
            activity=int(written) + int(dead) + int(skipped),
            hosts={
                _text(hosts[i]): HostInfo.from_json(_text(hosts[i]), _text(hosts[i + 1]))
                for i in range(0, len(hosts), 2)
            },
        )

    def leave(self, instance: str) -> None:
        """Drops this host now, so the others take its share at their next beat; only if the
        registration is ours (``instance``)."""
        self._leave(keys=[self._keys.hosts, self._keys.host_info], args=[self._host_id, instance])


# -- what the commands do ------------------------------------------------------------------------


def read_control(client: redis.Redis, keys: Keys) -> tuple[Control, dict[str, HostInfo]]:
    """The control values and the live hosts, read only (expired hosts are left for the beats
    to remove)."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.control)
    pipe.get(keys.stop)
    pipe.zrangebyscore(keys.hosts, "-inf", "+inf", withscores=True)
    pipe.hgetall(keys.host_info)
    control, stop, ranked, infos = pipe.execute()
    now_ms = redis_now_ms(client)
    fields = {_text(k): _text(v) for k, v in _pairs(control)}
    texts = {_text(k): _text(v) for k, v in _pairs(infos)}
    hosts = {
        _text(host): HostInfo.from_json(_text(host), texts.get(_text(host), "{}"))
        for host, expires in _pairs(ranked)
        if float(expires) > now_ms
    }
    return parse_control(fields, _text(stop) if stop else ""), hosts


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """(field, value) pairs of a HGETALL or a ZRANGE WITHSCORES reply, parsed or raw: redis-py's
    cluster pipeline returns raw flat lists inside a transaction."""
    if isinstance(reply, dict):
        return list(reply.items())
    if reply and isinstance(reply[0], (list, tuple)):
        return [tuple(pair) for pair in reply]
    return list(zip(reply[::2], reply[1::2], strict=True))


def redis_now_ms(client: redis.Redis) -> int:
    """Redis's clock: every host compares times against the same one."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def set_desired(
    client: redis.Redis,
    keys: Keys,
    size: int,
    by: str,
    mode: str = "scale",
    seen: int | None = None,
    cool_down: bool = True,
    extra: dict[str, str] | None = None,
) -> tuple[bool, int | None]:
    """Sets the group's desired size as ``lua/set_desired.lua`` describes (``mode`` scale, if
    or restore); returns whether it was set, and the previous size."""
    script = Script(client, "set_desired.lua", ("hash", "string"))
    args: list[Any] = [mode, "" if seen is None else seen, size, by, int(cool_down)]
    for field_name, value in (extra or {}).items():
        args += [field_name, value]
    applied, previous = script(keys=[keys.control, keys.stop], args=args)
    return int(applied) == 1, _whole(_text(previous)) or None


def clear_desired(client: redis.Redis, keys: Keys, by: str) -> int | None:
    """Removes the desired size (hosts go back to CONSUMERS_COUNT); returns the previous one.

    Leaves ``cleared_by``, so hosts can tell a size removed on purpose from one Redis lost, and
    the autoscaler does not take the size back.
    """
    pipe = client.pipeline(transaction=True)
    pipe.hget(keys.control, "desired")
    pipe.hdel(keys.control, "desired", "desired_by", "desired_at_ms")
    pipe.hset(keys.control, "cleared_by", by)
    previous = pipe.execute()[0]
    return _whole(_text(previous)) if previous else None


def request_stop(client: redis.Redis, keys: Keys, by: str) -> None:
    client.set(keys.stop, f"{by} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def clear_stop(client: redis.Redis, keys: Keys) -> bool:
    """Clears the stop key; True when it was set."""
    return bool(client.delete(keys.stop))
