"""How a daemon follows the control plane: its share of the group, group stop, idle stop, autoscale.

The supervisor calls :meth:`Steering.tick` from its loop; at most every ``beat_s`` it beats
(registers the host and reads the control plane in one script call) and answers with an
:class:`Order`: how many consumers to run here (None: no desired size in Redis, so the host's
own count) and whether to stop. Every change is logged once, with its cause. While Redis is
unreachable the last order stands: a host keeps its consumers rather than guess.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass

import redis

from processor.config import Bounds, Settings
from processor.errors import ConfigError, GroupStopped
from processor.group import autoscale
from processor.group.controlplane import Beat, HostInfo, HostRegistry, set_desired
from processor.group.shares import split
from processor.observe.counters import COUNTERS, read_counters
from processor.store.connection import CONNECTION_ERRORS, REDIS_ERRORS
from processor.store.keys import Keys
from processor.store.outage import Outage

log = logging.getLogger(__name__)

# A host beats at least this often, so a change reaches every host within about a second.
BEAT_MAX_S = 0.5


@dataclass(frozen=True)
class Order:
    size: int | None  # consumers to run here; None: no desired size, run the host's own count
    stop_reason: str | None = None  # why to stop; None to go on

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None


class Steering:
    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys) -> None:
        self._settings = settings
        self._client = client
        self._keys = keys
        self._host = settings.host
        self._instance = secrets.token_hex(8)
        self._registry = HostRegistry(client, keys, self._host, settings.heartbeat_ttl_ms)
        self._beat_s = min(BEAT_MAX_S, settings.heartbeat_ttl_ms / 3000)
        self._bounds = settings.autoscale_bounds
        self._interval_ms = int(settings.autoscale_interval_s * 1000)
        self._outage = Outage("Redis (control plane)")
        self._order = Order(None)
        self._claimed = False  # the host id is ours (claimed at start, or at a later beat)
        self._next_beat = 0.0
        # The first decision waits an interval: our consumers are still starting.
        self._next_decision = time.monotonic() + settings.autoscale_interval_s
        self._hold_until = 0.0
        self._invalid = ""
        self._last: Beat | None = None
        self._known_desired: int | None = None  # the last desired size seen in Redis
        self._shortfall = 0
        self._activity = -1
        self._active_at = time.monotonic()
        self._partition_counts = 0

    def start(self, running: int, stop: threading.Event) -> Order:
        """Claims the host id and reads the first order; refuses a stopped group, or a host id
        another live daemon holds.

        A registration left by a daemon of ours killed a moment ago (restarted by systemd, say)
        is waited out: it expires within ``HEARTBEAT_TTL_MS``, while a live daemon's never does.
        """
        deadline = time.monotonic() + 1.5 * self._settings.heartbeat_ttl_ms / 1000 + self._beat_s
        while True:
            beat = self._registry.beat(self._info(running), claim=True)
            if beat.claimed or stop.is_set():
                break
            if time.monotonic() >= deadline:
                raise ConfigError(self._taken(beat))
            held = beat.hosts.get(self._host)
            log.warning(
                "host id %r is registered by another daemon%s: waiting for it to expire",
                self._host,
                f" (pid {held.pid})" if held else "",
            )
            stop.wait(self._beat_s)
        if beat.control.stop:
            raise GroupStopped(beat.control.stop)
        self._claimed = beat.claimed
        now = time.monotonic()
        self._next_beat = now + self._beat_s
        self._next_decision = now + self._settings.autoscale_interval_s
        self._order = self._follow(beat, running)
        return self._order

    @property
    def next_beat(self) -> float:
        """When the next beat is due (monotonic): the supervisor wakes for it."""
        return self._next_beat

    def tick(self, running: int, received: int, now: float | None = None) -> Order:
        """The order for now; beats first when a beat is due. ``received`` is this host's
        consumers' total (for idle stop); ``now`` is monotonic time, given by tests."""
        now = time.monotonic() if now is None else now
        if now < self._next_beat:
            return self._order
        self._next_beat = now + self._beat_s
        try:
            beat = self._registry.beat(self._info(running), claim=not self._claimed)
            self._outage.recovered()
        except CONNECTION_ERRORS as error:
            self._outage.failed(error)
            return self._order
        except redis.RedisError as error:
            log.warning("control plane: host beat refused: %s", error)
            return self._order
        if not beat.claimed:  # never claimed at start (Redis was down), and now taken
            return Order(self._order.size, self._taken(beat))
        self._claimed = True
        if beat.rejoined and not beat.control.stop:
            # Our registration had expired (an outage, a Redis restart): the other hosts may not
            # have beaten again yet, and a split over us alone would start consumers only to
            # retire them a moment later. Keep what runs for one TTL.
            self._hold_until = now + self._settings.heartbeat_ttl_ms / 1000
            log.info(
                "host %s registered again: keeping its %d consumers for a TTL", self._host, running
            )
        if now < self._hold_until and not beat.control.stop:
            self._restore_if_lost(beat)
            return self._order
        order = self._follow(beat, running)
        if not order.stopping:
            activity = beat.activity + received + self._partition_activity()
            order = Order(order.size, self._idle(activity, now))
        if not order.stopping and self._bounds is not None and now >= self._next_decision:
            self._next_decision = now + self._settings.autoscale_interval_s
            self._autoscale(beat)
        self._order = order
        return order

    def leave(self) -> None:
        if not self._claimed:
            return
        try:
            self._registry.leave(self._instance)
        except REDIS_ERRORS as error:
            log.warning("control plane: could not deregister host %s: %s", self._host, error)

    # -- the pieces of a tick ----------------------------------------------------------------

    def _taken(self, beat: Beat) -> str:
        held = beat.hosts.get(self._host)
        holder = f" (pid {held.pid})" if held else ""
        return (
            f"invalid HOST_ID: {self._host!r} is already registered by a live daemon{holder}: "
            "give each daemon its own --host-id"
        )

    def _info(self, running: int) -> HostInfo:
        return HostInfo(
            self._host,
            self._instance,
            os.getpid(),
            self._settings.max_consumers,
            running,
            self._order.size,
            self._shortfall,
        )

    def _follow(self, beat: Beat, running: int) -> Order:
        """This host's share of the desired size, with the change logged once with its cause."""
        if beat.control.stop:
            return Order(self._order.size, f"the group is asked to stop: {beat.control.stop}")
        desired = beat.control.desired
        if beat.control.invalid != self._invalid:
            self._invalid = beat.control.invalid
            if self._invalid:
                log.warning(
                    "the group's desired size in Redis is %r, not a whole number >= 1: ignored "
                    "(set it with processor scale N)",
                    self._invalid,
                )
        causes = self._causes(beat)
        self._last = beat
        if self._restore_if_lost(beat):
            return Order(self._order.size)
        self._known_desired = desired
        if desired is None:
            if self._order.size is not None:
                log.info(
                    "desired size cleared: back to CONSUMERS_COUNT=%d",
                    self._settings.consumers_count,
                )
            self._shortfall = 0
            return Order(None)
        ceilings = {host: info.max_consumers for host, info in beat.hosts.items()}
        ceilings[self._host] = self._settings.max_consumers
        shares = split(desired, ceilings)
        share = shares.shares[self._host]
        if shares.shortfall and shares.shortfall != self._shortfall:
            log.warning(
                "desired %d exceeds what the %d live hosts may run (MAX_CONSUMERS: %s): %d short",
                desired,
                len(ceilings),
                ", ".join(f"{host} {limit}" for host, limit in sorted(ceilings.items())),
                shares.shortfall,
            )
        self._shortfall = shares.shortfall
        if share != self._order.size:
            log.info(
                "%s: share %d -> %d (hosts %s)",
                "; ".join(causes) or "control plane",
                running if self._order.size is None else self._order.size,
                share,
                ", ".join(f"{host} {n}" for host, n in shares.shares.items()),
            )
        return Order(share)

    def _restore_if_lost(self, beat: Beat) -> bool:
        """True when the desired size had vanished and we (or another host) put it back."""
        control = beat.control
        lost = control.desired is None and not control.cleared_by and not control.invalid
        if not lost or self._known_desired is None:
            return False
        self._restore(self._known_desired)
        return True

    def _restore(self, desired: int) -> None:
        """The desired size vanished without ``processor scale --clear``: Redis restarted
        without persistence, or was flushed. Put it back rather than fall back to
        CONSUMERS_COUNT on every host at once."""
        by = f"host {self._host}, restoring it after Redis lost it"
        try:
            restored, _ = set_desired(self._client, self._keys, desired, by, mode="restore")
        except REDIS_ERRORS as error:
            log.warning("control plane: could not restore the desired size: %s", error)
            return
        if restored:
            log.warning(
                "the group's desired size vanished from Redis without a clear (a restart "
                "without persistence, or a flush): restored it to %d",
                desired,
            )

    def _causes(self, beat: Beat) -> list[str]:
        last = self._last
        control = beat.control
        causes = []
        before = last.control.desired if last else None
        if control.desired != before:
            by = f" by {control.desired_by}" if control.desired is not None else ""
            causes.append(f"desired {before or 'unset'} -> {control.desired or 'unset'}{by}")
        old_hosts = set(last.hosts) if last else set()
        causes += [f"host {host} joined" for host in sorted(set(beat.hosts) - old_hosts)]
        causes += [f"host {host} left" for host in sorted(old_hosts - set(beat.hosts))]
        return causes

    def _partition_activity(self) -> int:
        """The partitions' write counters, summed: on a cluster they live in the partitions'
        slots, out of the host beat's reach, and a host whose consumers receive nothing (it runs
        none) must still see the group write."""
        if not self._keys.cluster or not self._settings.idle_stop_s:
            return 0
        try:
            counts = read_counters(self._client, self._keys)
            self._partition_counts = sum(counts[name] for name in COUNTERS)
        except REDIS_ERRORS as error:
            log.debug("control plane: partition counters not read: %s", error)
        return self._partition_counts

    def _idle(self, activity: int, now: float) -> str | None:
        """Why to stop for idleness, or None."""
        idle_after = self._settings.idle_stop_s
        if activity != self._activity:
            self._activity, self._active_at = activity, now
            return None
        if idle_after and now - self._active_at >= idle_after:
            return f"idle: the group received and wrote nothing for {idle_after:g} s (IDLE_STOP)"
        return None

    def _autoscale(self, beat: Beat) -> None:
        """One decision for the whole group, by whichever host takes this interval's turn.

        Sized against what the live hosts may run (their MAX_CONSUMERS summed), so a shortfall
        does not push the desired size up while no consumer can be added; written only if the
        desired size is still the one read (a ``processor scale`` in between wins), and never
        after ``processor scale --clear``, which hands the size back to the hosts.
        """
        bounds = self._bounds
        assert bounds is not None
        control = beat.control
        if control.cleared_by or control.invalid:
            return
        settings, keys = self._settings, self._keys
        capacity = sum(info.max_consumers for info in beat.hosts.values())
        limit = Bounds(bounds.low, max(bounds.low, min(bounds.high, capacity)))
        try:
            if not autoscale.take_turn(self._client, keys, self._host, self._interval_ms):
                return
            load = autoscale.group_load(self._client, keys)
            running = sum(info.running for info in beat.hosts.values())
            if control.desired is None and not running:
                return  # nothing to size from yet
            current = min(control.desired or running, limit.high)
            cooling = control.desired is not None and (
                (beat.now_ms - control.desired_at_ms) / 1000 < settings.autoscale_cooldown_s
            )
            decision = autoscale.decide(current, load, limit, cooling)
            note = f"{current} -> {decision.size}: {decision.reason} ({load})"
            if decision.size == control.desired:
                log.debug("autoscale: hold at %s", note)
                self._client.hset(keys.control, "autoscale", f"hold at {note}")
                return
            applied, _ = set_desired(
                self._client,
                keys,
                decision.size,
                f"autoscale on host {self._host}",
                mode="if",
                seen=control.desired,
                # Taking over the size as it is, or down to the hosts' capacity, changes nothing
                # that runs: no cool-down then.
                cool_down=decision.size != current,
                extra={"autoscale": note},
            )
            if applied:
                log.info("autoscale (host %s decides for the group): %s", self._host, note)
        except REDIS_ERRORS as error:
            log.warning("autoscale: no decision this interval: %s", error)
