"""After the group declared us dead: the reports of it, the batches its fence refused, and the
rejoin under a new id."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from processor.consumer.assembly import Parts
from processor.consumer.inbox import Inbox
from processor.consumer.membership import now_ms
from processor.consumer.messages import Entry
from processor.observe.logs import Tagged
from processor.store.connection import CONNECTION_ERRORS

# How often a stopping consumer tries to rejoin while Redis is away.
RETRY_S = 0.1


class Fence:
    """Told by the heartbeat (an empty list) and by the write thread (the batch the fence
    refused) from their threads; the consumer's loop alone takes them into ``fenced`` and
    ``unwritten``, and rejoins.

    Logs through the consumer's own logger (``tagged``): these lines were always the consumer's.
    """

    def __init__(
        self,
        parts: Parts,
        inbox: Inbox,
        takeovers: deque[list[bytes]],
        stop: threading.Event,
        dedup_window_ms: int,
        register: Callable[[], bool],
        batches: Callable[[list[Entry]], Iterator[list[Entry]]],
        tagged: Tagged,
    ) -> None:
        self._parts = parts
        self._inbox = inbox
        self._takeovers = takeovers
        self._stop = stop
        self._dedup_window_ms = dedup_window_ms
        self._register = register
        self._batches = batches
        self._log = tagged
        self._reports: queue.SimpleQueue[list[Entry]] = queue.SimpleQueue()
        # Entries refused, and taken from the reports: each counted by one thread only.
        self._refused = 0
        self._taken = 0
        self.fenced = False
        self.unwritten: list[Entry] = []

    def report(self, refused: list[Entry]) -> None:
        """From any thread: the group declared us dead; ``refused`` is what a write lost to it
        (only the write thread has any)."""
        if refused:
            self._refused += len(refused)
        self._reports.put(refused)

    def holding(self) -> int:
        """Entries the fence refused that we still hold (reported, or taken, not written)."""
        return self._refused - self._taken + len(self.unwritten)

    def take_reports(self) -> bool:
        """Takes what the heartbeat and the write thread reported of a fence; True if any."""
        reported = False
        while True:
            try:
                refused = self._reports.get_nowait()
            except queue.Empty:
                return reported
            self.unwritten.extend(refused)
            self._taken += len(refused)
            reported = True

    def rejoin(self) -> None:
        """We were declared dead (stalled past the heartbeat TTL): rejoin under a new id.

        What we hold was received before or during the stall. If another consumer has been live
        since before the stall, it took over our share; and if the stall was long enough for
        ids to be forgotten (half the dedup window), writing what we hold could duplicate it, so
        we drop it along with the socket's unread backlog. Otherwise we write it: the write skips
        whatever someone else wrote.
        """
        parts = self._parts
        parts.writes.wait_idle()
        self.take_reports()  # what the fence refused meanwhile
        old_id = parts.membership.consumer_id
        last_beat_ms = parts.membership.last_beat_ms
        stalled_ms = now_ms() - last_beat_ms
        try:
            members = parts.membership.read().members
        except CONNECTION_ERRORS:
            return  # Redis is away; the heartbeat stays fenced and we try again next step
        covered = any(
            registered < last_beat_ms for member, registered in members.items() if member != old_id
        )
        if covered and stalled_ms * 2 >= self._dedup_window_ms:
            self._drop_held(stalled_ms)
        try:
            registered = self._register()
        except CONNECTION_ERRORS:  # Redis away while we stop: still fenced, tried again
            registered = False
        if not registered:
            return
        # Reports of the old id made before the new one beat: the rejoin answers them.
        self.take_reports()
        self.fenced = False
        self._log.warning(
            "rejoined after a stall of %.1f s (was %s)",
            stalled_ms / 1000,
            old_id,
        )
        held, self.unwritten = self.unwritten, []
        # Batch by batch, as received: a batch is one script call on a single Redis, written
        # whole or refused whole by a fence, so a refusal never strands a written part here.
        for batch in self._batches(held):
            parts.writes.submit(batch)

    def write_refused(self) -> None:
        """At the end of a flush: while the fence refuses what we write (declared dead during
        the flush: a stall, Redis paused past the heartbeat TTL), rejoin, under an id never
        listed, and write it again. Nobody may be left to take it over: the whole group may
        be stopping. The supervisor's SHUTDOWN_GRACE bounds the tries."""
        writes = self._parts.writes
        writes.wait_idle()
        self.take_reports()
        # Only what was refused: a consumer stopped before it joined is "dead" too, holding none.
        while self.unwritten and writes.is_alive():
            self.fenced = True
            self.rejoin()
            if self.fenced:
                time.sleep(RETRY_S)  # Redis away: the rejoin could not register
            writes.wait_idle()
            self.take_reports()

    def _drop_held(self, stalled_ms: int) -> None:
        subscriber = self._parts.subscriber
        subscriber.reset()
        while not subscriber.wait_subscribed(0.1) and not self._stop.is_set():
            pass
        # The takeover buffer too: what it holds was received late, after the stall, so
        # its age no longer bounds how old it is, and a later takeover (or the shutdown
        # sweep) would retry it after its id was forgotten.
        dropped = len(self._inbox.drain()) + len(self.unwritten) + self._parts.strategy.discard()
        self.unwritten = []
        self._takeovers.clear()
        self._log.warning(
            "stalled %.1f s, past half the dedup window: dropped %d held messages, "
            "which live consumers took over",
            stalled_ms / 1000,
            dropped,
        )
