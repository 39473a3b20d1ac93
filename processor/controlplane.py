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
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis

from processor.keys import Keys
from processor.scripts import load_script


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
        try:
            data: dict[str, Any] = json.loads(text)
        except ValueError:
            data = {}
        share = data.get("share")
        return cls(
            host_id,
            str(data.get("instance", "")),
            int(data.get("pid", 0)),
            int(data.get("max", 0)),
            int(data.get("running", 0)),
            None if share is None else int(share),
            int(data.get("shortfall", 0)),
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


@dataclass(frozen=True)
class Beat:
    """What one host beat returned."""

    claimed: bool
    now_ms: int
    control: Control
    activity: int  # the group's written + dead + skipped: changes whenever anything is written
    hosts: dict[str, HostInfo]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_control(fields: dict[str, str], stop: str) -> Control:
    desired = fields.get("desired")
    return Control(
        int(desired) if desired else None,
        fields.get("desired_by", ""),
        int(fields.get("desired_at_ms") or 0),
        fields.get("autoscale", ""),
        stop,
        fields.get("cleared_by", ""),
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
        self._script = client.register_script(load_script("host_beat.lua"))

    def beat(self, info: HostInfo, claim: bool = False) -> Beat:
        keys = self._keys
        reply: Any = self._script(
            keys=[keys.hosts, keys.host_info, keys.control, keys.stop, keys.stats],
            args=[self._host_id, self._ttl_ms, info.to_json(), info.instance, int(claim)],
        )
        now_ms, claimed, control, stop, written, dead, skipped, hosts = reply
        fields = {_text(control[i]): _text(control[i + 1]) for i in range(0, len(control), 2)}
        return Beat(
            claimed=int(claimed) == 1,
            now_ms=int(now_ms),
            control=parse_control(fields, _text(stop)),
            activity=int(written) + int(dead) + int(skipped),
            hosts={
                _text(hosts[i]): HostInfo.from_json(_text(hosts[i]), _text(hosts[i + 1]))
                for i in range(0, len(hosts), 2)
            },
        )

    def leave(self) -> None:
        """Drops this host now, so the others take its share at their next beat."""
        pipe = self._client.pipeline(transaction=True)
        pipe.zrem(self._keys.hosts, self._host_id)
        pipe.hdel(self._keys.host_info, self._host_id)
        pipe.execute()


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
    fields = {_text(k): _text(v) for k, v in control.items()}
    texts = {_text(k): _text(v) for k, v in infos.items()}
    hosts = {
        _text(host): HostInfo.from_json(_text(host), texts.get(_text(host), "{}"))
        for host, expires in ranked
        if expires > now_ms
    }
    return parse_control(fields, _text(stop) if stop else ""), hosts


def redis_now_ms(client: redis.Redis) -> int:
    """Redis's clock: every host compares times against the same one."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def set_desired(
    client: redis.Redis,
    keys: Keys,
    size: int,
    by: str,
    clear_stop: bool = True,
    extra: dict[str, str] | None = None,
) -> int | None:
    """Sets the group's desired size (and clears the stop key unless told not to); returns the
    previous size."""
    at_ms = redis_now_ms(client)
    pipe = client.pipeline(transaction=True)
    pipe.hget(keys.control, "desired")
    mapping: dict[Any, Any] = {"desired": size, "desired_by": by, "desired_at_ms": at_ms}
    pipe.hset(keys.control, mapping=mapping | (extra or {}))
    pipe.hdel(keys.control, "cleared_by")
    if clear_stop:
        pipe.delete(keys.stop)
    previous = pipe.execute()[0]
    return int(previous) if previous else None


def clear_desired(client: redis.Redis, keys: Keys, by: str) -> int | None:
    """Removes the desired size (hosts go back to CONSUMERS_COUNT); returns the previous one.

    Leaves ``cleared_by``, so hosts can tell a size removed on purpose from one Redis lost.
    """
    pipe = client.pipeline(transaction=True)
    pipe.hget(keys.control, "desired")
    pipe.hdel(keys.control, "desired", "desired_by", "desired_at_ms")
    pipe.hset(keys.control, "cleared_by", by)
    previous = pipe.execute()[0]
    return int(previous) if previous else None


def restore_desired(client: redis.Redis, keys: Keys, size: int, by: str) -> bool:
    """Puts back a desired size that vanished without a clear; False if another host did."""
    if not client.hsetnx(keys.control, "desired", size):
        return False
    mapping: dict[Any, Any] = {"desired_by": by, "desired_at_ms": redis_now_ms(client)}
    client.hset(keys.control, mapping=mapping)
    return True


def request_stop(client: redis.Redis, keys: Keys, by: str) -> None:
    client.set(keys.stop, f"{by} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def clear_stop(client: redis.Redis, keys: Keys) -> bool:
    """Clears the stop key; True when it was set."""
    return bool(client.delete(keys.stop))
