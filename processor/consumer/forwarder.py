"""A reader's side of the feeds: it accepts the local consumers it feeds, one thread each, and
sends them what its view gives them (see :mod:`processor.consumer.feeds`)."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from multiprocessing.connection import Connection

from processor.consumer.feeds import ACK, HELLO, MESSAGES, TICK, TICK_S, is_sibling, listen
from processor.consumer.ownership import PartitionedStrategy
from processor.consumer.subscribers import Subscribers
from processor.consumer.threads import OnFailure, WatchedThread
from processor.observe.logs import Tagged

log = logging.getLogger(__name__)

# A batch sent to a fed consumer: the chunks queued meanwhile, up to SEND_MAX messages. With
# fewer than SEND_MIN at hand it first sleeps LINGER_S (as Kafka's linger.ms), so more arrive
# without waking it chunk by chunk: a busy reader's chunks hold ~10 messages for each consumer,
# and each wake-up and frame costs about as much as handing on a hundred messages.
SEND_MAX = 2000
SEND_MIN = 200
LINGER_S = 0.005


class Forwarder(WatchedThread):
    """Listens at ``address`` and starts an :class:`Outlet` per fed consumer that connects."""

    def __init__(
        self,
        address: str,
        strategy: PartitionedStrategy,
        subscribers: Subscribers,
        tagged: Tagged,
        on_failure: OnFailure,
        max_queued: int,
    ) -> None:
        super().__init__("forwarder", on_failure)
        self._max_queued = max_queued
        self._address = address
        self._strategy = strategy
        self._subscribers = subscribers
        self._log = tagged.on(log)
        self._stopping = threading.Event()
        self._outlets: list[Outlet] = []
        self.listening = False

    @property
    def fed(self) -> int:
        """How many consumers this reader feeds now."""
        return sum(o.member is not None and o.is_alive() for o in list(self._outlets))

    def stop(self) -> None:
        self._stopping.set()
        for outlet in list(self._outlets):
            outlet.stop()

    def work(self) -> None:
        server = self._bind()
        if server is None:
            return
        self.listening = True
        try:
            server.settimeout(TICK_S)
            while not self._stopping.is_set():
                try:
                    sock, _ = server.accept()
                except TimeoutError:
                    continue
                if not is_sibling(sock):
                    self._log.warning("feed socket: refused a process that is not one of ours")
                    sock.close()
                    continue
                sock.settimeout(None)
                outlet = Outlet(
                    Connection(sock.detach()),
                    self._strategy,
                    self._subscribers,
                    self._log,
                    self._on_failure,
                    self._max_queued,
                )
                self._outlets = [o for o in self._outlets if o.is_alive()] + [outlet]
                outlet.start()
        finally:
            server.close()

    def _bind(self) -> socket.socket | None:
        """Binds our address; the process we replace may still hold it for a moment (it is
        being killed), and until then the consumers we would feed go to another reader."""
        warned = False
        while not self._stopping.is_set():
            try:
                return listen(self._address)
            except OSError as error:
                if not warned:
                    warned = True
                    self._log.warning("feed socket busy (%s): retrying", error)
                time.sleep(TICK_S)
        return None


class Outlet(WatchedThread):
    """Feeds one local consumer: its messages (by our view) from the moment we answer its
    hello, a tick when idle; ends the feed when our subscription ends or the consumer leaves."""

    def __init__(
        self,
        connection: Connection,
        strategy: PartitionedStrategy,
        subscribers: Subscribers,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        on_failure: OnFailure,
        max_queued: int,
    ) -> None:
        super().__init__("outlet", on_failure)
        self._connection = connection
        self._strategy = strategy
        self._subscribers = subscribers
        self._log = log
        self._queue: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._sink = self._offer
        # Messages queued and not sent yet, offered - sent (each counted by one thread only), at
        # most max_queued: a consumer that stopped reading (stalled) cannot grow our memory.
        self._offered = 0
        self._sent = 0
        self._max_queued = max_queued
        self._overflowed = False
        self._stopping = threading.Event()
        self.member: str | None = None
        # The subscriptions confirmed when we answered: another one since means a loss between.
        self._subscriptions = 0

    def stop(self) -> None:
        self._stopping.set()

    def _offer(self, payloads: list[bytes]) -> None:
        """Called by the subscriber thread, under the strategy's lock: queue, never block."""
        if self._offered - self._sent >= self._max_queued:
            # What is not queued is in our takeover buffer: its gap report will find it.
            self._overflowed = True
            return
        self._offered += len(payloads)
        self._queue.put(payloads)

    def work(self) -> None:
        try:
            self._serve()
        except (OSError, EOFError) as error:
            # The consumer went away; what we routed to it is in our takeover buffer.
            self._log.debug("feed of %s ended: %r", self.member, error)
        finally:
            if self.member is not None:
                self._strategy.unfeed(self.member, self._sink)
            self._connection.close()

    def _serve(self) -> None:
        connection = self._connection
        while not self._stopping.is_set():
            if connection.poll(0 if self.member is not None else TICK_S):
                kind, value = connection.recv()
                if kind == HELLO:
                    self._welcome(value)
                continue
            if self.member is None:
                continue
            if self._overflowed:
                self._log.warning(
                    "%s stopped reading its feed (%d messages queued, more not): ending the "
                    "feed; if it reads again, it reports a gap and the readers try those",
                    self.member,
                    self._max_queued,
                )
                return
            if not self._still_subscribed():
                self._log.info(
                    "our subscription was lost: ending the feed of %s, which moves to "
                    "another reader and reports the gap",
                    self.member,
                )
                return
            if not self._strategy.feeds(self.member, self._sink):
                self._log.warning(
                    "another feed of %s took its place here: ending this one, so that it moves "
                    "and reports the gap",
                    self.member,
                )
                return
            try:
                batch = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                # True while we handle its messages ourselves: it stands by.
                connection.send((TICK, not self._strategy.spreading))
                continue
            if len(batch) < SEND_MIN:
                time.sleep(LINGER_S)
            # The lists are split()'s, handed over to us: extended in place, not copied.
            while len(batch) < SEND_MAX:
                try:
                    batch.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._sent += len(batch)
            connection.send((MESSAGES, batch))

    def _still_subscribed(self) -> bool:
        subscribers = self._subscribers
        return subscribers.is_subscribed() and subscribers.subscriptions == self._subscriptions

    def _welcome(self, member: str) -> None:
        """Feeds ``member`` once we are subscribed and have a view to route by."""
        while not (self._subscribers.is_subscribed() and self._strategy.has_view):
            # A consumer we do not answer in time closes and tries another reader: then this
            # connection reads as ended, which _serve finds (and a consumer that said more is
            # read there too), and this outlet must not feed a consumer that is gone.
            if self._stopping.is_set() or self._connection.poll(0.02):
                return
        self._subscriptions = self._subscribers.subscriptions
        if self.member is not None:
            self._strategy.unfeed(self.member, self._sink)
        self.member = member
        self._strategy.feed(member, self._sink)
        self._connection.send((ACK, member))
        self._log.info("feeding %s", member)
