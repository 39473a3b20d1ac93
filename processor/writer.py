"""The atomic lock-and-append: the one way messages reach the output and dead-letter streams."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import redis
from redis.cluster import RedisCluster

from processor.config import MAX_BATCH_SIZE
from processor.connection import (
    CONNECTION_ERRORS,
    Backoff,
    Outage,
    reread_layout,
    script_refusals,
)
from processor.dedup import Window, digest
from processor.keys import Keys
from processor.messages import DEAD, Entry
from processor.scripts import load_script
from processor.threads import OnFailure, WatchedThread

log = logging.getLogger(__name__)

# How often a blocked submit or wait checks that the write thread still lives.
_POLL_S = 0.1
# How long a write waits for WAIT_REPLICAS replicas; a partition whose replicas fell short
# is written without waiting for UNPROTECTED_S (no replica in sync: do not stall on it).
WAIT_TIMEOUT_MS = 1000
UNPROTECTED_S = 5.0


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: int
    dead: int
    skipped: int
    fenced: bool = False
    # One character per dead-letter entry of the batch: "1" appended, "0" already there.
    dead_flags: str = ""


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
    ) -> None:
        self._client = client
        self._maxlen = maxlen
        self._keys = keys
        self._window = Window.for_ttl(lock_ttl_ms)
        self._wait_replicas = wait_replicas
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

    def write(self, entries: Sequence[Entry], consumer_id: str, fence: str) -> WriteResult | None:
        """Writes the batch; retries connection failures until it succeeds.

        Returns None only when the consumer was asked to stop and Redis stayed unreachable for
        the grace period after that: the caller reports the batch as lost.
        """
        keys = self._keys
        if len(keys.partitions) == 1 and len(entries) <= MAX_BATCH_SIZE:
            return self._write_partition(0, entries, consumer_id, fence)
        written = dead = skipped = 0
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
            dead_indices = [index for index in indices if entries[index].kind == DEAD]
            flags.update(zip(dead_indices, result.dead_flags, strict=True))
        dead_flags = "".join(flag for _, flag in sorted(flags.items()))
        return WriteResult(written, dead, skipped, dead_flags=dead_flags)

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
        while True:
            wait = self._wait_replicas
            if wait and time.monotonic() < self._unprotected_until.get(partition, 0.0):
                wait = 0
            try:
                reply = evalsha_packed(
                    self._node(part.output), self._sha, self._source, script_keys, args, wait
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
            if wait and reply[4] < wait:
                self._unprotected_until[partition] = time.monotonic() + UNPROTECTED_S
                log.warning(
                    "%s %d of %d replicas confirmed a write to %s within %d ms: writing there "
                    "without waiting for %g s (a failover now could lose what they lack)",
                    self._context(),
                    reply[4],
                    wait,
                    part.output,
                    WAIT_TIMEOUT_MS,
                    UNPROTECTED_S,
                )
            written, dead, skipped = (int(value) for value in reply[:3])
            if written < 0:
                return WriteResult(0, 0, 0, fenced=True)
            return WriteResult(written, dead, skipped, dead_flags=layout.dead_flags(reply[3]))

    def _node(self, key: str) -> redis.Redis:
        """The client of the primary serving ``key``: the client itself on a single Redis."""
        if not self._keys.cluster:
            return self._client
        node = cast(RedisCluster, self._client).get_node_from_key(key)  # type: ignore[no-untyped-call]
        client: redis.Redis | None = node.redis_connection if node is not None else None
        if client is None:
            raise redis.exceptions.ClusterDownError(f"no primary known for {key}")
        return client


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
) -> list[Any]:
    """EVALSHA packed by hiredis in one call; loads ``source`` once if Redis lost it (a
    restart, a flush, or a replica promoted by a failover: the script cache is not replicated).
    With ``wait_replicas``, then WAITs on the same connection for that many replicas to have
    the write (WAIT_TIMEOUT_MS at most) and appends how many did to the reply.

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
            connection.send_command("WAIT", wait_replicas, WAIT_TIMEOUT_MS)
            reply = [*reply, int(connection.read_response())]
        return reply
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


@dataclass(frozen=True, slots=True)
class Batch:
    entries: list[Entry]
    received_at: float | None  # monotonic arrival of its oldest message, when known


class WriterGone(RuntimeError):
    """Raised by :meth:`WriteThread.submit` once the write thread has died."""


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
