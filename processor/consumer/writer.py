"""The atomic lock-and-append: the one way messages reach the output and dead-letter streams."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import hiredis
import redis
from redis.cluster import RedisCluster

from processor.config import MAX_BATCH_SIZE
from processor.consumer.dedup import Window, digest
from processor.consumer.messages import DEAD, Entry
from processor.consumer.threads import OnFailure, WatchedThread
from processor.errors import WriterGone
from processor.store.connection import (
    CONNECTION_ERRORS,
    DOWNTIME,
    SOCKET_TIMEOUT_S,
    Backoff,
    Outage,
    reread_layout,
    script_refusals,
)
from processor.store.keys import Keys
from processor.store.scripts import load_script

log = logging.getLogger(__name__)

# How often a blocked submit or wait checks that the write thread still lives.
_POLL_S = 0.1
# How long a write waits for WAIT_REPLICAS replicas; in degrade mode a partition whose
# replicas fell short is written without waiting for UNPROTECTED_S (no replica in sync: do not
# stall on it).
WAIT_TIMEOUT_MS = 1000
UNPROTECTED_S = 5.0
# In strict mode, how often a batch still held for its replicas is logged again.
HOLD_LOG_INTERVAL_S = 30.0


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: int
    dead: int
    skipped: int
    fenced: bool = False
    # One character per dead-letter entry of the batch: "1" appended, "0" already there.
    dead_flags: str = ""
    # Of written + dead: how many WAIT_REPLICAS replicas did not confirm before they were
    # accepted (a failover before the replicas catch up would lose them).
    unconfirmed: int = 0


class Writer:
    """Writes batches through ``dedup_append.lua``, retrying until Redis takes them.

    A retry after a dropped connection or a timeout is safe: if the first call ran, the ids it
    wrote are remembered and the retry skips them. On a cluster a batch is split by partition,
    one script call on each partition's primary; after an error the layout is read again, so a
    retry goes to the replica that took over.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        lock_ttl_ms: int,
        backoff_max_s: float,
        context: Callable[[], str],
        stop: threading.Event,
        grace_s: float,
        maxlen: int = 0,
        wait_replicas: int = 0,
        holding: Callable[[], int] | None = None,
        strict_wait: bool = False,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
    ) -> None:
        self._client = client
        self._maxlen = maxlen
        self._keys = keys
        self._window = Window.for_ttl(lock_ttl_ms)
        self._wait_replicas = wait_replicas
        self._strict_wait = strict_wait
        self._wait_timeout_ms = wait_timeout_ms
        # A held batch's WAIT doubles from wait_timeout_ms up to this: a WAIT returns as soon as
        # the replicas confirm, so a longer one only saves round trips; it stays well inside the
        # socket timeout, and short enough to see a stop request in time.
        self._hold_wait_max_ms = max(
            wait_timeout_ms, int(min(backoff_max_s, SOCKET_TIMEOUT_S / 2) * 1000)
        )
        self._source = load_script("dedup_append.lua")
        self._sha = hashlib.sha1(self._source.encode()).hexdigest()
        self._backoff = Backoff(0.05, backoff_max_s)
        self._outage = Outage(
            "Redis (writes)",
            context,
            detail=None if holding is None else lambda: f"holding {holding()} messages",
        )
        self._context = context
        self._stop = stop
        self._grace_s = grace_s
        # Per partition: until when writes skip WAIT after replicas fell short (monotonic).
        self._unprotected_until: dict[int, float] = {}
        # Strict mode, once stopping: when held batches are let go unconfirmed (monotonic).
        self._hold_until: float | None = None

    def write(self, entries: Sequence[Entry], consumer_id: str, fence: str) -> WriteResult | None:
        """Writes the batch; retries connection failures until it succeeds.

        Returns None only when the consumer was asked to stop and Redis stayed unreachable for
        the grace period after that: the caller reports the batch as lost.
        """
        keys = self._keys
        if len(keys.partitions) == 1 and len(entries) <= MAX_BATCH_SIZE:
            return self._write_partition(0, entries, consumer_id, fence)
        written = dead = skipped = unconfirmed = 0
        flags: dict[int, str] = {}
        for partition, indices in keys.script_calls([entry.lock_id for entry in entries]):
            part = [entries[index] for index in indices]
            result = self._write_partition(partition, part, consumer_id, fence)
            if result is None or result.fenced:
                return result
            written, dead, skipped = (
                written + result.written,
                dead + result.dead,
                skipped + result.skipped,
            )
            unconfirmed += result.unconfirmed
            dead_indices = [index for index in indices if entries[index].kind == DEAD]
            flags.update(zip(dead_indices, result.dead_flags, strict=True))
        dead_flags = "".join(flag for _, flag in sorted(flags.items()))
        return WriteResult(written, dead, skipped, dead_flags=dead_flags, unconfirmed=unconfirmed)

    def _write_partition(
        self, partition: int, entries: Sequence[Entry], consumer_id: str, fence: str
    ) -> WriteResult | None:
        keys, window = self._keys, self._window
        part = keys.partitions[partition]
        layout = _ScriptLayout(entries)
        args: list[str | bytes | int] = [
            part.seen_prefix,
            window.width_ms,
            window.buckets_checked,
            consumer_id,
            fence,
            self._maxlen,
            part.lock_prefix,
            *layout.args(),
        ]
        script_keys = [
            part.output,
            part.dead,
            part.stats,
            keys.fence(partition, consumer_id),
            part.legacy_locks,
            part.seen_clock,
        ]
        give_up_at: float | None = None
        hold = _Hold(part.output, len(entries), self._wait_timeout_ms)
        while True:
            wait = self._waits_for(partition)
            try:
                reply = evalsha_packed(
                    self._node(part.output),
                    self._sha,
                    self._source,
                    script_keys,
                    args,
                    wait,
                    self._wait_timeout_ms,
                    partial(self._held, hold) if self._strict_wait else None,
                )
            except CONNECTION_ERRORS as error:
                self._outage.failed(error)
                if self._keys.cluster:
                    reread_layout(self._client)
                if self._stop.is_set():
                    give_up_at = give_up_at or time.monotonic() + self._grace_s
                    if time.monotonic() >= give_up_at:
                        return None
                time.sleep(self._backoff.next_delay())
                continue
            self._backoff.reset()
            self._outage.recovered()
            DOWNTIME.end(hold, time.monotonic())
            confirmed = reply[4] if wait else 0
            if hold.first_reply is not None and int(reply[0]) >= 0:
                reply = self._released(hold, reply, confirmed)
            elif wait and confirmed < wait and not self._strict_wait:
                self._degrade(partition, confirmed)
            written, dead, skipped = (int(value) for value in reply[:3])
            if written < 0:
                return WriteResult(0, 0, 0, fenced=True)
            unconfirmed = written + dead if confirmed < self._wait_replicas else 0
            return WriteResult(
                written,
                dead,
                skipped,
                dead_flags=layout.dead_flags(reply[3]),
                unconfirmed=unconfirmed,
            )

    def _waits_for(self, partition: int) -> int:
        """How many replicas a write waits for: none for a partition degraded a moment ago, nor
        in strict mode once a stop's grace is over."""
        now = time.monotonic()
        if self._strict_wait:
            let_go = self._hold_until is not None and now >= self._hold_until
            return 0 if let_go else self._wait_replicas
        return 0 if now < self._unprotected_until.get(partition, 0.0) else self._wait_replicas

    def _degrade(self, partition: int, confirmed: int) -> None:
        self._unprotected_until[partition] = time.monotonic() + UNPROTECTED_S
        log.warning(
            "%s %d of %d replicas confirmed a write to %s within %d ms: writing there "
            "without waiting for %g s (a failover now could lose what they lack)",
            self._context(),
            confirmed,
            self._wait_replicas,
            self._keys.partitions[partition].output,
            self._wait_timeout_ms,
            UNPROTECTED_S,
        )

    def _held(self, hold: _Hold, reply: list[Any], confirmed: int) -> int | None:
        """Strict mode, after a WAIT that fell short: the next WAIT's timeout in ms, or None to
        let the batch go (nothing was written, or the stop's grace is over)."""
        if int(reply[0]) < 0:
            return None  # fenced: nothing written, nothing to confirm
        now = time.monotonic()
        if hold.first_reply is None:
            # Held since the WAIT that just fell short began.
            hold.since = now - self._wait_timeout_ms / 1000
            hold.first_reply, hold.logged_at = reply, now
            # The owners' writes to this primary are held alike: what they received meanwhile
            # may still be unwritten, so takeover buffers must not age it out (as in an outage).
            DOWNTIME.begin(hold, hold.since)
            log.warning(
                "%s holding %d messages written to %s: %d of %d replicas confirmed them within "
                "%d ms; waiting until they do (WAIT_REPLICAS_MODE=strict)",
                self._context(),
                hold.messages,
                hold.stream,
                confirmed,
                self._wait_replicas,
                self._wait_timeout_ms,
            )
        elif now - hold.logged_at >= HOLD_LOG_INTERVAL_S:
            hold.logged_at = now
            log.warning(
                "%s still holding %d messages written to %s after %.0f s: %d of %d replicas "
                "confirmed them",
                self._context(),
                hold.messages,
                hold.stream,
                now - hold.since,
                confirmed,
                self._wait_replicas,
            )
        if self._stop.is_set():
            self._hold_until = self._hold_until or now + self._grace_s
            if now >= self._hold_until:
                return None
        hold.timeout_ms = min(hold.timeout_ms * 2, self._hold_wait_max_ms)
        return hold.timeout_ms

    def _released(self, hold: _Hold, reply: list[Any], confirmed: int) -> list[Any]:
        """The end of a hold: confirmed, or let go at a stop. Returns the first run's counts
        with the last confirmation: a re-run after a dropped connection counts what the first
        wrote as skipped."""
        first = cast(list[Any], hold.first_reply)
        held_s = time.monotonic() - hold.since
        if confirmed >= self._wait_replicas:
            log.warning(
                "%s %d held messages written to %s confirmed by %d of %d replicas after %.1f s",
                self._context(),
                hold.messages,
                hold.stream,
                confirmed,
                self._wait_replicas,
                held_s,
            )
        else:
            log.warning(
                "%s stopping: %d held messages let go unconfirmed after %.1f s, %d of %d replicas "
                "confirmed them: they are written on the primary of %s, not lost, but a "
                "failover before its replicas catch up would lose them",
                self._context(),
                hold.messages,
                held_s,
                confirmed,
                self._wait_replicas,
                hold.stream,
            )
        return [*first[:4], confirmed]

    def _node(self, key: str) -> redis.Redis:
        """The client of the primary serving ``key``: the client itself on a single Redis."""
        if not self._keys.cluster:
            return self._client
        node = cast(RedisCluster, self._client).get_node_from_key(key)  # type: ignore[no-untyped-call]
        client: redis.Redis | None = node.redis_connection if node is not None else None
        if client is None:
            raise redis.exceptions.ClusterDownError(f"no primary known for {key}")
        return client


@dataclass(slots=True)
class _Hold:
    """One partition's batch in strict mode, held until its replicas confirm it."""

    stream: str
    messages: int
    timeout_ms: int  # of the next WAIT
    first_reply: list[Any] | None = None  # the script's reply, once a WAIT fell short
    since: float = 0.0
    logged_at: float = 0.0


class _ScriptLayout:
    """A batch as ``dedup_append.lua`` takes it: first occurrences of each dedup id, outputs then
    dead letters, digests first; repeats inside the batch are counted here as skipped."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self._output_digests: list[bytes] = []
        self._outputs: list[str | bytes] = []  # message_id, data
        self._dead_digests: list[bytes] = []
        self._dead: list[str | bytes] = []  # dedup id, reason, raw
        self._repeats = 0
        # Per dead letter of the batch, in order: its place among the dead letters sent, or
        # None for a repeat.
        self._dead_slots: list[int | None] = []
        firsts: set[bytes] = set()
        for entry in entries:
            key = digest(entry.lock_id)
            if key in firsts:
                self._repeats += 1
                if entry.kind == DEAD:
                    self._dead_slots.append(None)
                continue
            firsts.add(key)
            if entry.kind == DEAD:
                self._dead_slots.append(len(self._dead_digests))
                self._dead_digests.append(key)
                self._dead += (entry.lock_id, entry.a, entry.b)
            else:
                self._output_digests.append(key)
                self._outputs += (entry.lock_id, entry.a)

    def args(self) -> list[str | bytes | int]:
        return [
            len(self._output_digests),
            len(self._dead_digests),
            self._repeats,
            *self._output_digests,
            *self._dead_digests,
            *self._outputs,
            *self._dead,
        ]

    def dead_flags(self, script_flags: bytes) -> str:
        """The script's flags (one per dead letter sent) widened to every dead letter of the
        batch: "0" for a repeat inside it, which was not appended."""
        flags = script_flags.decode()
        return "".join("0" if slot is None else flags[slot] for slot in self._dead_slots)


def evalsha_packed(
    client: redis.Redis,
    sha: str,
    source: str,
    keys: list[str],
    args: Sequence[Any],
    wait_replicas: int = 0,
    wait_timeout_ms: int = WAIT_TIMEOUT_MS,
    hold: Callable[[list[Any], int], int | None] | None = None,
) -> list[Any]:
    """EVALSHA packed by hiredis in one call; loads ``source`` once if Redis lost it (a
    restart, a flush, or a replica promoted by a failover: the script cache is not replicated).
    With ``wait_replicas``, then WAITs on the same connection for that many replicas to have
    the write (``wait_timeout_ms`` at most) and appends how many did to the reply. After a
    WAIT that fell short, ``hold`` (given the reply and that count) returns the timeout of
    another WAIT, or None to return the shortfall. Only this connection's WAIT confirms the
    write: on another, WAIT counts from that connection's own last write.

    redis-py's Script packs the 400 arguments of a batch one by one in Python (about 2 µs
    per message); hiredis.pack_command packs the tuple in C.
    """
    command = ("EVALSHA", sha, len(keys), *keys, *args)
    packed = hiredis.pack_command(command)
    pool = client.connection_pool
    connection: Any = pool.get_connection()
    try:
        send = connection.send_packed_command
        send([packed], check_health=False)
        with script_refusals():
            try:
                reply: list[Any] = connection.read_response()
            except redis.exceptions.NoScriptError:
                # A restarted or flushed Redis lost the script: load it, then call it again.
                connection.send_command("SCRIPT", "LOAD", source)
                connection.read_response()
                send([packed], check_health=False)
                reply = connection.read_response()
        if wait_replicas:
            confirmed = _wait(connection, wait_replicas, wait_timeout_ms)
            while confirmed < wait_replicas and hold is not None:
                timeout_ms = hold(reply, confirmed)
                if timeout_ms is None:
                    break
                confirmed = _wait(connection, wait_replicas, timeout_ms)
            reply = [*reply, confirmed]
        return reply
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _wait(connection: Any, replicas: int, timeout_ms: int) -> int:
    """WAIT on ``connection``: how many replicas have its writes."""
    connection.send_command("WAIT", replicas, timeout_ms)
    try:
        return int(connection.read_response())
    except redis.ResponseError as error:
        if not str(error).startswith("UNBLOCKED"):
            raise
        # The primary was demoted while we waited (it closes the connection after this reply):
        # retried like a dropped connection, on whichever node is primary now.
        raise redis.ConnectionError(str(error)) from error


@dataclass(frozen=True, slots=True)
class Batch:
    entries: list[Entry]
    received_at: float | None  # monotonic arrival of its oldest message, when known


class WriteThread(WatchedThread):
    """Writes batches in order on its own thread.

    The consumer processes the next batch while the script call for the previous one is in
    flight; at most ``depth`` batches wait, so a slow Redis slows the consumer instead of
    filling its memory (the subscriber keeps draining the socket regardless).
    """

    def __init__(
        self,
        writer: Writer,
        identity: Callable[[], tuple[str, str]],
        on_done: Callable[[Batch, WriteResult | None, float], None],
        on_failure: OnFailure,
        depth: int = 2,
    ) -> None:
        super().__init__("writer", on_failure)
        self._writer = writer
        self._identity = identity
        self._on_done = on_done
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        # The batch being written (set and cleared by the write thread only).
        self._current: Batch | None = None

    def submit(self, entries: list[Entry], received_at: float | None = None) -> None:
        """Queues a batch; ``received_at`` is when its oldest message arrived, if known."""
        self._put(Batch(entries, received_at))

    def wait_idle(self) -> None:
        """Returns once every submitted batch has been written (or the thread has died)."""
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks and self.is_alive():
                done.wait(_POLL_S)

    def holding(self) -> int:
        """Entries submitted and not written yet: queued, or in the call being retried."""
        with self._queue.mutex:
            queued = sum(len(batch.entries) for batch in self._queue.queue if batch is not None)
        current = self._current
        return queued + (len(current.entries) if current is not None else 0)

    def close(self) -> None:
        if self.is_alive():
            self._put(None)
            self.join()

    def _put(self, item: Batch | None) -> None:
        while True:
            if not self.is_alive():
                raise WriterGone("the write thread has died")
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def work(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                self._current = batch
                consumer_id, fence = self._identity()
                started = time.monotonic()
                result = self._writer.write(batch.entries, consumer_id, fence)
                self._on_done(batch, result, started)
                self._current = None
            finally:
                self._queue.task_done()
