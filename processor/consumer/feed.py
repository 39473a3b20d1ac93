"""A fed consumer's side of the feeds: its messages come from one of the host's readers, not
from a subscription of its own (see :mod:`processor.consumer.feeds`).

It offers what :class:`~processor.consumer.subscribers.Subscribers` offers the consumer, so the
loop, the fence and the reporting do not tell them apart. A feed that ends (the reader died,
lost its subscription, or went silent past ``stall_s``) is a gap, as a lost subscription is:
once another reader feeds us, the gap is reported and every reader tries what it buffered for
us, so nothing routed to us while we were moving is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from processor.consumer.feeds import ACK, HELLO, MESSAGES, TICK, connect
from processor.consumer.subscriber import Gap, Receiver, now_ms
from processor.consumer.threads import OnFailure
from processor.errors import FeedEnded
from processor.observe.logs import Tagged
from processor.store.outage import Backoff, Outage, Retrier

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
# How long a reader has to answer our hello: it waits until it is subscribed and has a view
# (a reader just started takes about a second). A stalled reader's socket still accepts
# connections: we then try the next one, so a stall costs this long without a feed.
ACK_TIMEOUT_S = 2.0
POLL_S = 0.1
# How long a new consumer waits quietly for a reader to listen: they start together.
STARTING_S = 10.0
# How long of that it waits for its preferred reader only, so the feeding stays spread.
PREFERRED_S = 3.0


class Feed(Receiver):
    """Receives our messages from the first reader of ``addresses`` that feeds us."""

    def __init__(
        self,
        addresses: list[str],
        deliver: Callable[[list[bytes]], None],
        on_gap: Callable[[Gap], None],
        tagged: Tagged,
        stall_s: float,
        on_failure: OnFailure,
    ) -> None:
        super().__init__("feed", deliver, on_gap, tagged, log, on_failure)
        self._addresses = addresses
        self._stall_s = stall_s
        self._member = ""
        # Orders a rename against the check that a reader feeds us under our current id.
        self._naming = threading.Lock()
        self.reader: int | None = None
        # Our reader handles our messages itself (its ticks say so): we own our lanes but
        # receive nothing (see processor.consumer.spread).
        self.standing_by = False
        # Where the next search for a reader starts: after the one whose feed ended.
        self._first = 0
        self._fed_once = False
        self._born = time.monotonic()
        self._quiet_until = self._born + STARTING_S
        self._retrier = Retrier(
            Outage("a local reader's feed", tagged), Backoff(0.05, 1.0), self._stop_requested
        )

    # -- what Subscribers offers ----------------------------------------------------------------

    def is_subscribed(self) -> bool:
        return self.subscribed.is_set()

    def wait_subscribed(self, timeout_s: float) -> bool:
        return self.subscribed.wait(timeout_s)

    def connections(self) -> list[tuple[tuple[str, int] | None, int]]:
        return []  # no subscription of ours for Redis to hold a backlog for

    def rename(self, member: str) -> bool:
        """Feeds ``member`` from now on; True when that needs a new feed (wait_subscribed)."""
        with self._naming:
            if member == self._member:
                return False
            first = not self._member
            self._member = member
            if not first:
                self.reset()
        return True

    # -- the thread -------------------------------------------------------------------------------

    def work(self) -> None:
        down_since: int | None = None
        while not self._stop_requested.is_set():
            self._reset_requested.clear()
            connection = self._connect()
            if connection is None:
                continue
            try:
                self._confirmed(down_since)
                down_since = None
                self._read(connection)
            except (OSError, EOFError) as error:
                down_since = self._last_alive
                self._log.warning(
                    "feed from local reader %s ended (%s): moving to another reader",
                    self.reader,
                    error,
                )
            finally:
                self.subscribed.clear()
                self.standing_by = False  # no reader: nothing handles our messages now
                self.reader = None
                connection.close()

    def _connect(self) -> Connection | None:
        """Asks each reader in turn; backs off after a round that none answered."""
        error: BaseException | None = None
        count = len(self._addresses)
        starting = not self._fed_once and time.monotonic() < self._born + PREFERRED_S
        for step in range(1 if starting else count):
            index = (self._first + step) % count
            address = self._addresses[index]
            if self._stop_requested.is_set():
                return None
            try:
                connection = connect(address, CONNECT_TIMEOUT_S, self._stall_s)
            except OSError as refused:
                error = refused
                continue
            try:
                connection.send((HELLO, self._member))
                if not connection.poll(ACK_TIMEOUT_S):
                    raise FeedEnded("no answer to our hello")
                kind, value = connection.recv()
                with self._naming:  # fed as who we are now, or renamed after (and reset)
                    if kind != ACK or value != self._member:
                        raise FeedEnded(f"unexpected answer {kind!r}")
                    self.subscribed.set()
            except (OSError, EOFError) as failed:
                connection.close()
                error = failed
                continue
            self.reader = int(address.rpartition("-")[2])
            self._first = (index + 1) % count
            return connection
        if not self._fed_once and time.monotonic() < self._quiet_until:
            # Starting with the group: the readers are not listening yet.
            self._stop_requested.wait(0.05)
        else:
            self._retrier.failed(error or FeedEnded("no reader"))
        return None

    def _confirmed(self, down_since: int | None) -> None:
        self._fed_once = True
        self._retrier.succeeded()
        self._last_alive = now_ms()
        if down_since is None:
            self._log.debug("fed by local reader %s", self.reader)
            return
        gap = self._count_gap(down_since)
        self._log.warning(
            "fed again by local reader %s after a gap of %.3f s: the readers try what they "
            "buffered for us",
            self.reader,
            gap.length_s,
        )
        self._on_gap(gap)

    def _read(self, connection: Connection) -> None:
        """Delivers what the reader sends until stopped or reset; raises when the feed ends."""
        deliver = self._deliver
        last_frame = time.monotonic()
        while not self._stop_requested.is_set() and not self._reset_requested.is_set():
            if not connection.poll(POLL_S):
                if time.monotonic() - last_frame > self._stall_s:
                    raise FeedEnded(f"silent for {self._stall_s:g} s")
                continue
            try:
                kind, value = connection.recv()
            except BlockingIOError:  # the socket's read timeout: stalled inside a frame
                raise FeedEnded(f"silent for {self._stall_s:g} s inside a frame") from None
            last_frame = time.monotonic()
            self._last_alive = now_ms()
            if kind == MESSAGES:
                self.standing_by = False
                self.received += len(value)
                deliver(value)
            elif kind == TICK:
                self.standing_by = bool(value)
