"""The heartbeat thread: keeps one consumer in the group and follows the group's changes.

Every interval it extends the heartbeat and reads the live members (one script call), adopts
the new view in the ownership strategy, hands buffered messages it now has to try to the
consumer (takeovers), publishes its own subscription gaps and reads the others', and checks how
much the server holds unread for its subscription; a reader also chooses again whether to send
the consumers it feeds their messages (spreading). It has its own connection, so a slow write
never delays a heartbeat.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import redis

from processor.consumer.backlog import server_backlog_bytes
from processor.consumer.membership import Membership, now_ms
from processor.consumer.ownership import PartitionedStrategy, RaceStrategy
from processor.consumer.spread import Spread
from processor.consumer.subscriber import Gap
from processor.consumer.threads import OnFailure, WatchedThread
from processor.errors import WrongType
from processor.observe.logs import Tagged
from processor.store.connection import CONNECTION_ERRORS, REDIS_ERRORS
from processor.store.keys import Keys
from processor.store.keytypes import name_wrong_key
from processor.store.outage import Backoff, Outage, Retrier

log = logging.getLogger(__name__)

BACKLOG_CHECK_S = 1.0
BACKLOG_WARN_REPEAT_S = 10.0
GAPS_MAXLEN = 10_000


class Heartbeat(WatchedThread):
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        membership: Membership,
        strategy: RaceStrategy | PartitionedStrategy,
        interval_s: float,
        backlog_warn_bytes: int,
        stop: threading.Event,
        done: threading.Event,
        tagged: Tagged,
        subscriptions: Callable[[], list[tuple[tuple[str, int] | None, int]]],
        on_takeover: Callable[[list[bytes]], None],
        on_fenced: Callable[[], None],
        on_failure: OnFailure,
        status: Callable[[], Mapping[str, str | int | float]],
        report: Callable[[], None],
        gaps: queue.SimpleQueue[Gap],
        side_client: redis.Redis | None = None,
        on_recovered: Callable[[str], None] | None = None,
        spread: Spread | None = None,
        retain_margin_s: float = 0.0,
    ) -> None:
        super().__init__("heartbeat", on_failure)
        self._client = client
        # For the backlog checks: on a cluster a client with short timeouts and no retries, so
        # a subscription's node that stops answering cannot hold up the beats.
        self._side_client = side_client or client
        self._keys = keys
        self.membership = membership
        self._strategy = strategy
        self._interval_s = interval_s
        self._backlog_warn_bytes = backlog_warn_bytes
        self._stopping = stop
        self._done = done
        self._log = tagged.on(log)
        self._subscriptions = subscriptions
        self._on_takeover = on_takeover
        self._on_fenced = on_fenced
        self._status = status
        self._report = report
        # What Redis held unsent for our subscription at the last check (CLIENT LIST omem).
        self.backlog_bytes = 0
        # Held across register + first beat, so a view never mixes two identities.
        self.lock = threading.Lock()
        # The id the group declared dead at our last beat, if any (changed under ``lock``).
        self._dead_as: str | None = None
        # Our subscriptions' gaps, handed over by the readers; the ones not published yet.
        self._gaps = gaps
        self._unpublished: deque[Gap] = deque()
        self._members: frozenset[str] = frozenset()
        # A reader's choice to send the consumers it feeds their messages (consumer/spread.py).
        self._spread = spread
        # How much longer than a member holds a message unwritten we keep our copy of it: the
        # time for its death to be noticed.
        self._retain_margin_s = retain_margin_s
        started = f"{now_ms()}-0"
        self._seen = {keys.gaps: started, keys.departures: started}
        # Capped at the interval: a heartbeat that waits longer than that risks its TTL.
        self._retrier = Retrier(
            Outage("Redis (heartbeat)", tagged, on_recovered=on_recovered),
            Backoff(0.05, interval_s),
            done,
        )
        self._events_outage = Outage("Redis (group events)", tagged, on_recovered=on_recovered)
        self._backlog_warned = 0.0
        self._parent_pid = os.getppid()

    def work(self) -> None:
        self._report()
        next_beat = time.monotonic() + self._interval_s
        next_backlog_check = time.monotonic()
        # Beats on after a stop request until the consumer has flushed (``done``): a heartbeat
        # that expired mid-flush would fence every write left.
        while not self._done.is_set():
            try:
                departed = self._events_or_wait(next_beat - time.monotonic())
                due = time.monotonic() >= next_beat
                if self._done.is_set() or not (due or departed):
                    continue
                if due:
                    next_beat = time.monotonic() + self._interval_s
                    self._check_supervisor()
                self._report()
                with self.lock:
                    self.beat()
                self._publish_gaps()
                self._retain_for_holders()
                if time.monotonic() >= next_backlog_check:
                    next_backlog_check = time.monotonic() + BACKLOG_CHECK_S
                    try:
                        self._check_backlog()
                    except CONNECTION_ERRORS as error:
                        # On a cluster it asks the node of each subscription, which may be the
                        # one failing over: not a failed heartbeat.
                        self._log.debug("backlog not checked: %s", error)
            except CONNECTION_ERRORS as error:
                # Reported all the same: a subscription lost with Redis shows at once, and the
                # supervisor takes a consumer whose reports stop for one stalled.
                self._report()
                self._retrier.failed(error)
                next_beat = time.monotonic()
                continue
            self._retrier.succeeded()
        self._report()  # the last: every write is done by now
        self._publish_last_gaps()

    @property
    def members(self) -> frozenset[str]:
        """The live consumers at the last beat, ourselves included."""
        return self._members

    def _check_supervisor(self) -> None:
        if os.getppid() != self._parent_pid and not self._stopping.is_set():
            self._log.error("supervisor is gone: stopping")
            self._stopping.set()

    def beat(self) -> None:
        """One heartbeat; the caller holds ``lock``."""
        view = self.membership.beat(self._status())
        me = self.membership.consumer_id
        if not view.alive:
            # Said and handed to the consumer loop once per id: the loop rejoins under a new one.
            if self._dead_as != me:
                self._dead_as = me
                self._say_dead()
                self._on_fenced()
            return
        members = frozenset(view.members)
        if members != self._members:
            self._members = members
            taken = self._strategy.update(members, me)
            self._log.info("group changed: %d live consumers", len(members))
            if taken:
                self._on_takeover(taken)
        if self._spread is not None:
            self._spread.beat()

    def _retain_for_holders(self) -> None:
        """Keeps our copies as long as another member has held a message unwritten (a slow
        handler's backlog), and the margin: a copy gone before its owner dies is a loss."""
        if not isinstance(self._strategy, PartitionedStrategy):
            return
        with self._client.pipeline(transaction=False) as pipe:
            for member in self._members - {self.membership.consumer_id}:
                pipe.hmget(self._keys.info(member), "held_for_ms", "beat_ms")
            replies = pipe.execute(raise_on_error=False)
        read_ms = now_ms()
        oldest_ms = 0
        for reply in replies:
            try:  # a status hash gone, or of another type, or not ours: no holder to cover
                held_ms, beat_ms = int(reply[0]), int(reply[1])
            except (TypeError, ValueError):
                continue
            oldest_ms = max(oldest_ms, held_ms + max(0, read_ms - beat_ms))
        self._strategy.retain(oldest_ms / 1000 + self._retain_margin_s)

    def _say_dead(self) -> None:
        """Why the group declared us dead: our heartbeat expired (a stall past the TTL), or,
        found gone though our last live beat was less than the TTL before this reply, it was
        deleted: Redis lost the group's keys, and maybe the dedup window with them."""
        since_ms = now_ms() - self.membership.last_beat_ms
        if not self.membership.registered():
            self._log.warning("heartbeat had expired: the group declared us dead")
            return
        self._log.warning(
            "the group declared us dead: our heartbeat key was gone %.1f s after our last beat, "
            "before its TTL; Redis lost the group's keys (FLUSHALL, a restart without "
            "persistence, a failover to a replica that lacked them) or someone deleted them; "
            "ids written before may be written again if the dedup window went with them",
            since_ms / 1000,
        )

    def _events_or_wait(self, timeout_s: float) -> bool:
        """As :meth:`_wait_for_events`; with the gaps or departures stream overwritten by
        another type, waits instead (logged as an outage of its own), so that the beats go on:
        a consumer that stops beating is declared dead and its share taken over."""
        try:
            departed = self._wait_for_events(timeout_s)
        except WrongType as error:
            streams = [(self._keys.gaps, "stream"), (self._keys.departures, "stream")]
            self._events_outage.failed(
                name_wrong_key(error, self._client, streams, "the group's events")
            )
            self._done.wait(max(0.0, timeout_s))
            return False
        self._events_outage.recovered()
        return departed

    def _wait_for_events(self, timeout_s: float) -> bool:
        """Reads gaps and departures, blocking up to ``timeout_s`` for the next one.

        Returns True when a member of our view departed: the caller beats at once, so the new
        view (which no longer holds it) starts the takeover of its share.
        """
        block_ms = int(timeout_s * 1000)
        streams: Any = dict(self._seen)
        reply: Any = self._client.xread(
            streams, count=1000, block=block_ms if block_ms >= 1 else None
        )
        departed = False
        me = self.membership.consumer_id
        for stream, entries in reply or []:
            name = stream.decode()
            for entry_id, fields in entries:
                self._seen[name] = entry_id.decode()
                member = fields[b"consumer_id"].decode()
                if member == me or member not in self._members:
                    continue
                if name == self._keys.departures:
                    departed = True
                    self._log.info(
                        "%s left (%s): taking over its share",
                        member,
                        fields[b"reason"].decode(errors="replace"),
                    )
                else:
                    self._gap_reported(member)
        return departed

    def _gap_reported(self, member: str) -> None:
        taken = self._strategy.gap_reported(member)
        if taken:
            self._log.info(
                "%s reported a subscription gap: trying %d of its buffered messages",
                member,
                len(taken),
            )
            self._on_takeover(taken)

    def _publish_last_gaps(self) -> None:
        """Gaps since the last beat (a fed consumer moved as its reader stopped first) are in
        our stop line's count: published too, if Redis takes them."""
        try:
            self._publish_gaps()
        except REDIS_ERRORS as error:
            self._log.warning(
                "%d subscription gaps not published: %s", len(self._unpublished), error
            )

    def _publish_gaps(self) -> None:
        while True:
            try:
                self._unpublished.append(self._gaps.get_nowait())
            except queue.Empty:
                break
        while self._unpublished:
            gap = self._unpublished[0]
            self._client.xadd(
                self._keys.gaps,
                {
                    "consumer_id": self.membership.consumer_id,
                    "start_ms": gap.start_ms,
                    "end_ms": gap.end_ms,
                },
                maxlen=GAPS_MAXLEN,
                approximate=True,
            )
            self._unpublished.popleft()

    def _check_backlog(self) -> None:
        """Warns well before Redis cuts us off for reading slowly (client-output-buffer-limit)."""
        connections = self._subscriptions()
        if not connections:
            return
        # The fullest subscription: Redis cuts each connection off on its own.
        omem = max(
            server_backlog_bytes(self._side_client, client_id, node)
            for node, client_id in connections
        )
        self.backlog_bytes = omem
        now = time.monotonic()
        if omem >= self._backlog_warn_bytes and now - self._backlog_warned >= BACKLOG_WARN_REPEAT_S:
            self._backlog_warned = now
            self._log.warning(
                "falling behind: Redis holds %.1f MiB unread for our subscription "
                "(it cuts subscribers off at client-output-buffer-limit pubsub, 32 MiB by default)",
                omem / 2**20,
            )
