"""One subscription per reader, not per consumer: how a host's consumers find their readers.

The first ``READERS_PER_HOST`` slots of a host are *readers*: they subscribe, keep the takeover
buffer, and forward to each other local consumer (a *fed* consumer, which does not subscribe)
the messages their view of the group gives it. A fed consumer is fed by one reader at a time
and moves to another when that feed ends; each reader listens on a Unix socket named after the
supervisor, in Linux's abstract namespace (nothing on disk to clean up after a kill -9).

The protocol, over ``multiprocessing.connection`` (length-prefixed pickles): the fed consumer
sends ``(HELLO, consumer id)``; the reader answers ``(ACK, consumer id)`` once it is subscribed
and routes by a view of the group, then sends ``(MESSAGES, [payload, ...])`` and, when idle,
``(TICK, standing by)``, so a stalled reader is noticed (standing by: True while the reader
handles the consumer's messages itself, see :mod:`processor.consumer.spread`). A reader ends
every feed when its subscription ends: the fed consumer then reports a gap, as a subscriber
would.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection

HELLO, ACK, MESSAGES, TICK = "hello", "ack", "messages", "tick"
# How often an idle reader says it is alive.
TICK_S = 0.2


@dataclass(frozen=True, slots=True)
class FeedPlan:
    """The readers of one host: how many, and the prefix of their sockets' names."""

    prefix: str
    readers: int

    def is_reader(self, slot: int) -> bool:
        return slot < self.readers

    def address(self, reader: int) -> str:
        return f"\0{self.prefix}-reader-{reader}"

    def addresses_for(self, slot: int) -> list[str]:
        """The readers a fed consumer tries, its preferred one first: fed consumers are
        spread over the readers, so the forwarding is shared."""
        first = slot % self.readers
        return [self.address((first + step) % self.readers) for step in range(self.readers)]


def is_sibling(sock: socket.socket) -> bool:
    """Whether the other end is a consumer of our daemon (our user, our parent). The abstract
    namespace has no permissions and the frames are pickles: a feed socket must serve and
    trust our own processes only."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            parent = int(stat.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return uid == os.getuid() and parent == os.getppid()


def connect(address: str, timeout_s: float, read_timeout_s: float) -> Connection:
    """A connection whose every read fails with an OSError after ``read_timeout_s`` without a
    byte: ``poll`` bounds the wait for a frame, this the wait inside one (a reader stalled in
    the middle of a frame would otherwise hold us forever)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(address)
        sock.settimeout(None)
        seconds, fraction = divmod(read_timeout_s, 1.0)
        timeval = struct.pack("ll", int(seconds), int(fraction * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        if not is_sibling(sock):
            raise ConnectionRefusedError(f"{address[1:]!r} is not held by a reader of ours")
    except BaseException:
        sock.close()
        raise
    return Connection(sock.detach())


def listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(256)
    except BaseException:
        sock.close()
        raise
    return sock
