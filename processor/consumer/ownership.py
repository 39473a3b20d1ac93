"""Which received messages a consumer tries: the strategy interface and its two strategies.

``race``: every consumer tries every message; the write picks the writer. Instant failover,
but the work per message grows with the group.

``partitioned``: each message belongs to one of ``LANES`` lanes (CRC32 of the raw payload), and
each lane to one live consumer, chosen by rendezvous hashing, so a membership change moves only
the lanes of the consumer that left or joined. A consumer that subscribes (a *reader*) keeps the
recent messages it does not own in a :class:`TakeoverBuffer`, with the owner it was routed to;
when that owner leaves, dies or reports a subscription gap, every other reader tries what it
routed to it (one successor could be a newcomer that never received it, or in a gap of its
own). A reader also forwards to the local consumers it *feeds* (which do not subscribe) the
messages its view gives them, and buffers those too, as it buffers every message it does not
own; or, while the handler is cheap, handles them itself (spreading, consumer/spread.py). A
reader that hands lanes (its own or a fed consumer's) to a newcomer it does not feed keeps
routing them as before for a grace period, in case messages published before the newcomer was
fed are still unread in its socket, or the newcomer's reader adopts the new view later.
Ownership never decides correctness: the write does.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Collection

from processor.store.outage import DOWNTIME

LANES = 1024
_LANE_MASK = LANES - 1
# How long a reader keeps routing lanes handed to a newcomer as before: messages published before
# the newcomer subscribed may still be unread in our socket when we adopt the new view.
HANDOVER_GRACE_S = 1.0
# Where split() sends a lane: nowhere local (buffered only), this consumer, or a fed consumer
# (FED and above, by its index in the sinks).
NOT_LOCAL, MINE, FED = 0, 1, 2

Owners = list[str | None]
Sink = Callable[[list[bytes]], None]


def handover_grace_s(heartbeat_interval_ms: int) -> float:
    """The grace: a second, and two heartbeat intervals for the newcomer's reader (which beats
    as often) to adopt the new view too."""
    return HANDOVER_GRACE_S + 2 * heartbeat_interval_ms / 1000


def lane_of(payload: bytes) -> int:
    return zlib.crc32(payload) & _LANE_MASK


def _weight(member: str, lane: int) -> int:
    digest = hashlib.blake2b(f"{lane}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_lanes(members: Collection[str]) -> list[str | None]:
    """The owner of every lane among ``members`` (rendezvous hashing); None when empty."""
    ordered = sorted(members)
    if not ordered:
        return [None] * LANES
    return [max(ordered, key=lambda member: _weight(member, lane)) for lane in range(LANES)]


class TakeoverBuffer:
    """The recent payloads this consumer received but does not own, bounded by age and count.

    A payload is kept for ``max_age_s`` of time in which Redis took our commands (``downtime``
    does not count: while Redis was away or refused writes, its owner could not write it
    either), and never past ``max_held_s`` (a takeover then could outlive the dedup window).
    """

    def __init__(
        self,
        max_age_s: float,
        max_count: int,
        max_held_s: float,
        downtime: Callable[[float], float],
    ) -> None:
        self._base_age_s = self._max_age_s = max_age_s
        self._max_count = max_count
        self._max_held_s = max_held_s
        self._downtime = downtime
        # Each chunk: when it arrived, that moment less the downtime before it, and the owners
        # it was routed by (a view's list, never mutated).
        self._chunks: deque[tuple[float, float, Owners, list[bytes]]] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def retain(self, age_s: float) -> None:
        """Keeps payloads for ``age_s`` at least (within ``max_held_s``), until told less."""
        self._max_age_s = max(self._base_age_s, min(age_s, self._max_held_s))

    def held(self, now: float) -> int:
        """How many payloads it still holds at ``now``, what has aged out dropped first."""
        self._prune(now)
        return self._count

    def add(self, chunk: list[bytes], now: float, owners: Owners) -> None:
        self._chunks.append((now, now - self._downtime(now), owners, chunk))
        self._count += len(chunk)
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Drops what is too old or too much. Also before every read: on a quiet channel no
        add() comes, and a takeover must not retry what the dedup window has forgotten."""
        oldest_allowed = now - self._downtime(now) - self._max_age_s
        oldest_held = now - self._max_held_s
        while self._chunks and (
            self._chunks[0][1] < oldest_allowed
            or self._chunks[0][0] < oldest_held
            or self._count - len(self._chunks[0][3]) >= self._max_count
        ):
            self._count -= len(self._chunks.popleft()[3])

    def clear(self) -> int:
        count, self._count = self._count, 0
        self._chunks.clear()
        return count

    def since(self, moment: float, now: float) -> list[bytes]:
        self._prune(now)
        return [
            payload for added, _, _, chunk in self._chunks if added >= moment for payload in chunk
        ]

    def relabel(self, old: Owners, new: Owners) -> None:
        """Treats the chunks routed by view ``old`` as routed by view ``new``."""
        self._chunks = deque(
            (added, uptime, new if owners is old else owners, chunk)
            for added, uptime, owners, chunk in self._chunks
        )

    def routed_to(self, members: Collection[str], now: float) -> list[bytes]:
        """The payloads that were routed to one of ``members`` when they arrived."""
        self._prune(now)
        return [
            payload
            for _, _, owners, chunk in self._chunks
            for payload in chunk
            if owners[zlib.crc32(payload) & _LANE_MASK] in members
        ]


class RaceStrategy:
    """Every consumer tries every message."""

    name = "race"
    buffered = 0

    def split(self, chunk: list[bytes], now: float) -> list[bytes]:
        return chunk

    def update(self, members: Collection[str], me: str, now: float | None = None) -> list[bytes]:
        return []

    def gap_reported(self, member: str, now: float | None = None) -> list[bytes]:
        return []

    def discard(self) -> int:
        return 0

    def leaving(self, since: float) -> list[bytes]:
        return []


class PartitionedStrategy:
    """Each message is tried by the owner of its lane; others keep it for a takeover."""

    name = "partitioned"

    def __init__(
        self,
        buffer_age_s: float,
        buffer_max: int,
        buffer_held_s: float,
        downtime: Callable[[float], float],
        clock: Callable[[], float] = time.monotonic,
        grace_s: float = HANDOVER_GRACE_S,
    ) -> None:
        self._clock = clock
        self._grace_s = grace_s
        # One lock orders routing against view changes: a payload routed by the old view is in
        # the buffer before a takeover under the new view looks for it.
        self._lock = threading.Lock()
        self._buffer = TakeoverBuffer(buffer_age_s, buffer_max, buffer_held_s, downtime)
        self._owners: Owners = [None] * LANES
        # Per lane, where split() sends it (NOT_LOCAL, MINE or a fed consumer's FED + index).
        self._routing = [NOT_LOCAL] * LANES
        # Lanes handed by a local member (us or one we feed) to a newcomer: lane -> old owner.
        self._handed: dict[int, str] = {}
        self._grace_until = 0.0
        self._members: set[str] = set()
        self._me = ""
        # The consumers we feed: id -> where their messages go.
        self._fed: dict[str, Sink] = {}
        self._sinks: list[Sink] = []
        # Whether their messages go to them, or stay with us (consumer/spread.py; set by spread).
        self.spreading = True

    @property
    def buffered(self) -> int:
        """What the takeover buffer holds now: after traffic stops, it drains as entries age
        out, though no split() comes to prune it."""
        with self._lock:
            return self._buffer.held(self._clock())

    @property
    def has_view(self) -> bool:
        with self._lock:
            return self._me in self._members

    def split(self, chunk: list[bytes], now: float) -> list[bytes]:
        """The payloads of ``chunk`` this consumer owns; those of the consumers it feeds go to
        their sinks; all but its own go to the takeover buffer."""
        owned: list[bytes] = []
        others: list[bytes] = []
        fed: dict[int, list[bytes]] = {}
        with self._lock:
            if self._grace_until and now >= self._grace_until:
                self._grace_until = 0.0
                self._handed = {}
                self._route()
            routing = self._routing
            for payload in chunk:
                target = routing[zlib.crc32(payload) & _LANE_MASK]
                if target == MINE:
                    owned.append(payload)
                    continue
                others.append(payload)
                if target:
                    fed.setdefault(target, []).append(payload)
            if others:
                self._buffer.add(others, now, self._owners)
            # Under the lock: once feed() returns, every later split reaches the new sink.
            for target, payloads in fed.items():
                self._sinks[target - FED](payloads)
        return owned

    def feed(self, member: str, sink: Sink) -> None:
        """From now on, sends ``member``'s messages (by our view) to ``sink`` as well."""
        with self._lock:
            self._fed[member] = sink
            self._route()

    def feeds(self, member: str, sink: Sink) -> bool:
        """Whether ``member``'s messages go to ``sink``: another feed of it (a late answer to
        a hello it had given up on) may have taken its place, or dropped it on ending."""
        with self._lock:
            return self._fed.get(member) is sink

    def unfeed(self, member: str, sink: Sink) -> None:
        with self._lock:
            if self._fed.get(member) is sink:
                del self._fed[member]
                self._route()

    def spread(self, spreading: bool) -> None:
        """From now on, sends the consumers we feed their messages, or handles them ourselves."""
        with self._lock:
            self.spreading = spreading
            self._route()

    def retain(self, age_s: float) -> None:
        """Keeps copies for ``age_s`` at least: a member holds messages unwritten that long."""
        with self._lock:
            self._buffer.retain(age_s)

    def send_to_fed(self, payloads: list[bytes], now: float) -> list[bytes]:
        """Sends the consumers we feed what ``payloads`` (ours, not handled yet) holds of theirs
        now, copies kept as for any message we send them; returns the rest."""
        kept: list[bytes] = []
        sent: dict[int, list[bytes]] = {}
        with self._lock:
            routing = self._routing
            for payload in payloads:
                target = routing[zlib.crc32(payload) & _LANE_MASK]
                if target >= FED:
                    sent.setdefault(target, []).append(payload)
                else:
                    kept.append(payload)
            for target, chunk in sent.items():
                self._buffer.add(chunk, now, self._owners)
                self._sinks[target - FED](chunk)
        return kept

    def lanes(self) -> tuple[int, int]:
        """How many lanes our view gives us, and us and the consumers we feed together."""
        with self._lock:
            own = sum(owner == self._me for owner in self._owners)
            return own, own + sum(owner in self._fed for owner in self._owners)

    def _route(self) -> None:
        """Recomputes where each lane goes; the caller holds the lock."""
        self._sinks = list(self._fed.values())
        local = {
            member: FED + index if self.spreading else MINE
            for index, member in enumerate(self._fed)
        }
        if self._me:
            local[self._me] = MINE
        routing = [local.get(owner, NOT_LOCAL) if owner else NOT_LOCAL for owner in self._owners]
        for lane, old_owner in self._handed.items():
            # A newcomer we feed gets its lanes from us at once: only the others' wait.
            if routing[lane] == NOT_LOCAL:
                routing[lane] = local.get(old_owner, NOT_LOCAL)
        self._routing = routing

    def update(self, members: Collection[str], me: str, now: float | None = None) -> list[bytes]:
        """Adopts a new view of the group; returns buffered payloads this consumer took over.

        Taken over: whatever was routed to a member that is no longer live, whoever owns its
        lane now (the new owner may have joined after the death and never received it); and,
        on our first view, all we buffered before it.
        """
        now = time.monotonic() if now is None else now
        owners = assign_lanes(members)
        live = set(members)
        with self._lock:
            newcomers = live - self._members - {me}
            if self._members:
                taken = self._buffer.routed_to(self._members - live, now)
            else:
                # Everything buffered so far was routed to nobody, and its owners by this view
                # may not have received it (a reader that subscribed later, a consumer not yet
                # fed): we try all of it now, and the write lets one writer through. Counted as
                # routed by this view, so it is tried again if its owner departs.
                self._buffer.relabel(self._owners, owners)
                taken = self._buffer.since(float("-inf"), now)
            local = {me, *self._fed}
            if now >= self._grace_until:
                self._handed = {}
            handed = {
                lane: old
                for lane, (old, new) in enumerate(zip(self._owners, owners, strict=True))
                if old in local and new in newcomers
            }
            if handed:
                self._handed.update(handed)
                self._grace_until = now + self._grace_s
            if now >= self._grace_until:
                self._grace_until = 0.0
            self._owners = owners
            self._members = live
            self._me = me
            self._route()
            return taken

    def gap_reported(self, member: str, now: float | None = None) -> list[bytes]:
        """Buffered payloads routed to ``member``, which this consumer must try for it.

        ``member`` missed messages while its subscription was down, but it is still live, so
        its lanes are still its own. Every other member tries them, not only one successor:
        that one may have been in a gap of its own at the same time (CLIENT KILL TYPE pubsub,
        a Redis restart). The exactly-once write lets one write each message.
        """
        with self._lock:
            if member == self._me or self._me not in self._members:
                return []
            return self._buffer.routed_to({member}, time.monotonic() if now is None else now)

    def discard(self) -> int:
        """Empties the takeover buffer; returns how many payloads it held."""
        with self._lock:
            return self._buffer.clear()

    def leaving(self, since: float) -> list[bytes]:
        """Everything buffered since ``since``, for a consumer whose group is stopping.

        When the whole group stops, a consumer that unsubscribes last has received messages
        whose owners had already unsubscribed; nobody else will take those over.
        """
        with self._lock:
            return self._buffer.since(since, time.monotonic())


class FedStrategy(RaceStrategy):
    """A fed consumer's: its reader sends it only what it owns and keeps the copies (the
    takeover buffer) itself; so everything received is tried, and nothing is buffered here."""

    name = "partitioned"


def make_strategy(
    name: str,
    buffer_age_s: float,
    buffer_max: int,
    buffer_held_s: float,
    grace_s: float = HANDOVER_GRACE_S,
) -> RaceStrategy | PartitionedStrategy:
    if name == "race":
        return RaceStrategy()
    return PartitionedStrategy(
        buffer_age_s, buffer_max, buffer_held_s, DOWNTIME.total_s, grace_s=grace_s
    )
