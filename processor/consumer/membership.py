"""Birth, heartbeat and death of one consumer, and the live view of the group.

A consumer is live while its heartbeat key exists. ``CONSUMERS_LIST`` holds the ids; the
membership script prunes every id whose heartbeat has expired (a crashed consumer runs no
``finally``), so a dead id lingers at most ``heartbeat_ttl_ms`` plus one heartbeat interval.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from processor.store.connection import CONNECTION_ERRORS
from processor.store.keys import Keys
from processor.store.scripts import Script

log = logging.getLogger(__name__)


# Departures kept for the others to read: each is read within a heartbeat interval.
DEPARTURES_MAXLEN = 1000


def process_id_prefix(pid: int, slot: int) -> str:
    """What every id a consumer process registers under starts with (a rejoin changes the rest)."""
    return f"{socket.gethostname()}-{pid}-{slot}-"


def new_consumer_id(slot: int) -> str:
    """Unique across hosts and restarts: host, pid, the supervisor's slot and a random suffix."""
    return process_id_prefix(os.getpid(), slot) + secrets.token_hex(3)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class View:
    """What one heartbeat learned: whether we are still live, and who is."""

    alive: bool
    members: dict[str, int]  # id -> registered at (ms)


def parse_view(reply: list[bytes]) -> View:
    members: dict[str, int] = {}
    for index in range(1, len(reply), 2):
        value = reply[index + 1].decode()
        members[reply[index].decode()] = int(value.rpartition(":")[2] or 0)
    return View(alive=int(reply[0]) == 1, members=members)


class Membership:
    """Registers, refreshes and removes one consumer id; reads the group."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        heartbeat_ttl_ms: int,
        fence_ttl_ms: int = 0,
        side_client: redis.Redis | None = None,
    ) -> None:
        self._client = client
        # On a cluster the fences live on every partition's primary: a client with short
        # timeouts and no retries, so one that stops answering cannot hold up the heartbeat.
        self._side_client = side_client or client
        self._keys = keys
        self._ttl_ms = heartbeat_ttl_ms
        self._fence_ttl_ms = max(fence_ttl_ms, heartbeat_ttl_ms)
        self._script = Script(client, "membership.lua", ("list", "hash"))
        self._leave = leave_script(client)
        self.consumer_id = ""
        self.token = ""
        self.last_beat_ms = 0
        # Set once we hand our share to the others (``step_down``), for this id.
        self.stepped_down = False
        self._step_down_reason = ""

    def register(self, consumer_id: str, listed: bool = True) -> None:
        """Joins the group: heartbeat and list entry in one transaction. Not ``listed``: a
        heartbeat only, as after a step down (a stopping consumer's id, only to write)."""
        self.consumer_id = consumer_id
        self.stepped_down = not listed
        sent_ms = now_ms()
        self.token = f"{secrets.token_hex(4)}:{sent_ms}"
        with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.heartbeat(consumer_id), self.token, px=self._ttl_ms)
            if listed:
                # LREM first: a retried registration must not list the id twice.
                pipe.lrem(self._keys.consumers, 0, consumer_id)
                pipe.rpush(self._keys.consumers, consumer_id)
            pipe.execute()
        self._refresh_fences()
        self.last_beat_ms = sent_ms

    def registered(self) -> bool:
        """Listed as far as we know: our last beat that found us live was less than the TTL
        ago (a beat that fails, or finds us dead, leaves it older)."""
        return bool(self.consumer_id) and now_ms() - self.last_beat_ms < self._ttl_ms

    def beat(self, status: Mapping[str, str | int | float] | None = None) -> View:
        """Extends our heartbeat (and writes ``status`` to our status hash), prunes dead ids
        and returns the live members."""
        # Stamped when sent, not when the reply is read: a stall in between (SIGSTOP, a long GC)
        # must count as time without a heartbeat, or a rejoin underestimates its stall.
        sent_ms = now_ms()
        pairs: list[str | int | float] = ["beat_ms", sent_ms]
        for name, value in (status or {}).items():
            pairs += [name, value]
        reply = self._script(
            keys=[self._keys.consumers, self._keys.info(self.consumer_id)],
            args=[
                self._keys.heartbeat_prefix,
                self.consumer_id,
                self._ttl_ms,
                self._keys.info_prefix,
                0 if self.stepped_down else 1,
                *pairs,
            ],
        )
        view = parse_view(reply)
        # Listed after our step down: it did not reach Redis. Again, before more is routed to us.
        listed = view.alive and self.stepped_down and self.consumer_id in view.members
        if listed and self._try_step_down():
            del view.members[self.consumer_id]
        if view.alive:
            self.last_beat_ms = sent_ms
            try:
                self._refresh_fences()
            except CONNECTION_ERRORS as error:
                # A partition's primary is down (a failover): the view is still ours to act on,
                # and the fence's TTL outlives the heartbeat's for this.
                log.debug("fences not refreshed: %s", error)
        return view

    def _refresh_fences(self) -> None:
        """On a cluster, a write checks a fence key in its partition's slot, set again (not
        only extended) on every live beat, so one lost in a failover comes back.

        A fence outlives the heartbeat (TAKEOVER_BUFFER_MS against HEARTBEAT_TTL_MS), so a
        failover of a partition's primary (about 2 s) does not fence every consumer at once.
        A consumer declared dead can write inside that margin; its writes are still
        deduplicated, and DEDUP_WINDOW_MS > 2 x TAKEOVER_BUFFER_MS keeps them inside the window.
        """
        fences = self._keys.fences(self.consumer_id)
        if not fences:
            return
        with self._side_client.pipeline(transaction=False) as pipe:
            for fence in fences:
                pipe.set(fence, self.token, px=self._fence_ttl_ms)
            pipe.execute()

    def read(self) -> View:
        """The live members, without touching our own heartbeat."""
        return parse_view(
            self._script(
                # No status hash is written; a name under the prefix keeps ACL key patterns happy.
                keys=[self._keys.consumers, self._keys.info_prefix],
                args=[self._keys.heartbeat_prefix, "", 1, self._keys.info_prefix, 1],
            )
        )

    def step_down(self, reason: str) -> None:
        """Hands our share to the others while we still hold messages to write: the id leaves
        the list (the others take over at once, as for a departure) and its heartbeat stays,
        so our last writes are not fenced. ``leave`` ends it. Redis unreachable: every beat from
        now on tries again (and none lists us again)."""
        if not self.consumer_id:
            return
        self.stepped_down = True
        self._step_down_reason = reason
        self._try_step_down()

    def _try_step_down(self) -> bool:
        """One attempt; False (logged) when it did not reach Redis: the next beat tries again
        (a failure of this alone is not the beat's)."""
        try:
            remove(self._leave, self._keys, self.consumer_id, False, self._step_down_reason, True)
        except CONNECTION_ERRORS as error:
            log.warning("could not hand our share over yet (%s): the heartbeat tries again", error)
            return False
        return True

    def leave(self, reason: str) -> None:
        """Leaves the group and tells the others, who take over our share at once."""
        if self.consumer_id:
            remove(self._leave, self._keys, self.consumer_id, is_prefix=False, reason=reason)
            fences = self._keys.fences(self.consumer_id)
            if fences:
                with self._client.pipeline(transaction=False) as pipe:
                    for fence in fences:
                        pipe.delete(fence)
                    pipe.execute()


def leave_script(client: redis.Redis) -> Script:
    """``leave.lua``, registered once by whoever removes consumers (themselves, or their
    supervisor), so it is read from disk once per process."""
    return Script(client, "leave.lua", ("list", "stream"))


def remove(
    script: Script, keys: Keys, match: str, is_prefix: bool, reason: str, keep: bool = False
) -> list[str]:
    reply = script(
        keys=[keys.consumers, keys.departures],
        args=[
            keys.heartbeat_prefix,
            match,
            int(is_prefix),
            reason,
            DEPARTURES_MAXLEN,
            keys.info_prefix,
            int(keep),
        ],
    )
    return [item.decode() for item in reply]


def evict_process(script: Script, keys: Keys, pid: int, slot: int, reason: str) -> list[str]:
    """Removes every id a dead consumer process registered under; returns them.

    The supervisor calls this (with ``leave_script``) the moment it sees a consumer exit, so the
    others take over its share within milliseconds instead of when its heartbeat expires.
    """
    return remove(script, keys, process_id_prefix(pid, slot), is_prefix=True, reason=reason)


def read_view(client: redis.Redis, keys: Keys) -> View:
    """The live members, pruning dead ids on the way (for the supervisor and the tools)."""
    return Membership(client, keys, heartbeat_ttl_ms=1).read()
