"""Which received messages a consumer tries: the strategy interface and its two strategies.

``race``: every consumer tries every message; the lock picks the writer. Instant failover,
but the work per message grows with the group.

``partitioned``: each message belongs to one of ``SLOTS`` slots (CRC32 of the raw payload), and
each slot to one live consumer, chosen by rendezvous hashing, so a membership change moves only
the slots of the consumer that left or joined. A consumer keeps the recent messages it does not
own in a :class:`TakeoverBuffer`; when an owner leaves, dies or reports a subscription gap, the
new owners of its slots try those messages. Ownership never decides correctness: the lock does.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from collections import deque
from collections.abc import Collection

SLOTS = 1024
_SLOT_MASK = SLOTS - 1


def slot_of(payload: bytes) -> int:
    return zlib.crc32(payload) & _SLOT_MASK


def _weight(member: str, slot: int) -> int:
    digest = hashlib.blake2b(f"{slot}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_slots(members: Collection[str]) -> list[str | None]:
    """The owner of every slot among ``members`` (rendezvous hashing); None when empty."""
    ordered = sorted(members)
    if not ordered:
        return [None] * SLOTS
    return [max(ordered, key=lambda member: _weight(member, slot)) for slot in range(SLOTS)]


class TakeoverBuffer:
    """The recent payloads this consumer received but does not own, bounded by age and count."""

    def __init__(self, max_age_s: float, max_count: int) -> None:
        self._max_age_s = max_age_s
        self._max_count = max_count
        self._chunks: deque[tuple[float, list[bytes]]] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, chunk: list[bytes], now: float) -> None:
        self._chunks.append((now, chunk))
        self._count += len(chunk)
        oldest_allowed = now - self._max_age_s
        while self._chunks and (
            self._chunks[0][0] < oldest_allowed
            or self._count - len(self._chunks[0][1]) >= self._max_count
        ):
            self._count -= len(self._chunks.popleft()[1])

    def oldest_age_s(self, now: float) -> float:
        return now - self._chunks[0][0] if self._chunks else 0.0

    def since(self, moment: float) -> list[bytes]:
        return [payload for added, chunk in self._chunks if added >= moment for payload in chunk]

    def in_slots(self, slots: Collection[int]) -> list[bytes]:
        wanted = bytearray(SLOTS)
        for slot in slots:
            wanted[slot] = 1
        return [
            payload
            for _, chunk in self._chunks
            for payload in chunk
            if wanted[zlib.crc32(payload) & _SLOT_MASK]
        ]


class RaceStrategy:
    """Every consumer tries every message."""

    name = "race"

    def split(self, chunk: list[bytes], now: float) -> list[bytes]:
        return chunk

    def update(self, members: Collection[str], me: str) -> list[bytes]:
        return []

    def gap_reported(self, member: str) -> list[bytes]:
        return []

    def leaving(self, since: float) -> list[bytes]:
        return []


class PartitionedStrategy:
    """Each message is tried by the owner of its slot; others keep it for a takeover."""

    name = "partitioned"

    def __init__(self, buffer_age_s: float, buffer_max: int) -> None:
        # One lock orders routing against view changes: a payload routed by the old view is in
        # the buffer before a takeover under the new view looks for it.
        self._lock = threading.Lock()
        self._buffer = TakeoverBuffer(buffer_age_s, buffer_max)
        self._owners: list[str | None] = [None] * SLOTS
        self._mine = bytearray(SLOTS)
        self._members: set[str] = set()
        self._me = ""

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def split(self, chunk: list[bytes], now: float) -> list[bytes]:
        """The payloads of ``chunk`` this consumer owns; the rest go to the takeover buffer."""
        mine = self._mine
        owned: list[bytes] = []
        others: list[bytes] = []
        with self._lock:
            for payload in chunk:
                if mine[zlib.crc32(payload) & _SLOT_MASK]:
                    owned.append(payload)
                else:
                    others.append(payload)
            if others:
                self._buffer.add(others, now)
        return owned

    def update(self, members: Collection[str], me: str) -> list[bytes]:
        """Adopts a new view of the group; returns buffered payloads this consumer took over.

        Taken over: the slots whose previous owner is no longer live (or that had no owner)
        and that now belong to ``me``.
        """
        owners = assign_slots(members)
        live = set(members)
        with self._lock:
            taken = [
                slot
                for slot, (old, new) in enumerate(zip(self._owners, owners, strict=True))
                if new == me and old != me and (old is None or old not in live)
            ]
            self._owners = owners
            self._members = live
            self._me = me
            self._mine = bytearray(owner == me for owner in owners)
            return self._buffer.in_slots(taken) if taken else []

    def gap_reported(self, member: str) -> list[bytes]:
        """Buffered payloads of ``member``'s slots that this consumer must try for it.

        ``member`` missed messages while its subscription was down, but it is still live, so
        its slots are still its own. Each of them is covered by the consumer that would own it
        if ``member`` were gone: the same rendezvous choice as a takeover, so no slot is left out.
        """
        with self._lock:
            others = sorted(self._members - {member})
            if self._me not in others:
                return []
            covered = [
                slot
                for slot, owner in enumerate(self._owners)
                if owner == member and max(others, key=lambda m: _weight(m, slot)) == self._me
            ]
            return self._buffer.in_slots(covered) if covered else []

    def leaving(self, since: float) -> list[bytes]:
        """Everything buffered since ``since``, for a consumer whose group is stopping.

        When the whole group stops, a consumer that unsubscribes last has received messages
        whose owners had already unsubscribed; nobody else will take those over.
        """
        with self._lock:
            return self._buffer.since(since)


def make_strategy(
    name: str, buffer_age_s: float, buffer_max: int
) -> RaceStrategy | PartitionedStrategy:
    if name == "race":
        return RaceStrategy()
    return PartitionedStrategy(buffer_age_s, buffer_max)
