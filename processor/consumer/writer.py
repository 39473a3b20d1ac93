"""The atomic deduplicate-and-append: the one way messages reach the output and dead-letter
streams."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

import redis
from redis.cluster import RedisCluster

from processor.config import MAX_BATCH_SIZE
from processor.consumer.dedup import Window, digest
from processor.consumer.messages import DEAD, Entry
from processor.errors import RetryGaveUp
from processor.observe.logs import Tagged
from processor.store.connection import SOCKET_TIMEOUT_S, reread_layout
from processor.store.keys import Keys
from processor.store.outage import DOWNTIME, Backoff, Outage, Retrier
from processor.store.script_call import WAIT_TIMEOUT_MS, evalsha_packed
from processor.store.scripts import load_script

log = logging.getLogger(__name__)

# In degrade mode a partition whose replicas fell short within WAIT_TIMEOUT_MS is written
# without waiting for UNPROTECTED_S (no replica in sync: do not stall on it).
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
        dedup_window_ms: int,
        backoff_max_s: float,
        tagged: Tagged,
        stop: threading.Event,
        grace_s: float,
        maxlen: int = 0,
        wait_replicas: int = 0,
        holding: Callable[[], int] | None = None,
        strict_wait: bool = False,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
        on_recovered: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._maxlen = maxlen
        self._keys = keys
        self._window = Window.for_ttl(dedup_window_ms)
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
        outage = Outage(
            "Redis (writes)",
            tagged,
            detail=None if holding is None else lambda: f"holding {holding()} messages",
            on_recovered=on_recovered,
        )
        # No stop event: a stopping consumer's writes go on retrying, for grace_s at most.
        self._retrier = Retrier(outage, Backoff(0.05, backoff_max_s))
        self._log = tagged.on(log)
        self._stop = stop
        self._grace_s = grace_s
        # Per partition: until when writes skip WAIT after replicas fell short (monotonic).
        self._unprotected_until: dict[int, float] = {}
        # Strict mode, once stopping: when held batches are let go unconfirmed (monotonic).
        self._hold_until: float | None = None
        # Once stopping: when failing writes are given up (monotonic), from an outage's first
        # failure; cleared by a write that goes through.
        self._give_up_at: float | None = None

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
        for partition, indices in keys.script_calls([entry.dedup_id for entry in entries]):
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
        layout = _ScriptLayout(entries, dead_letter_time())
        args: list[str | bytes | int] = [
            part.seen_prefix,
            window.width_ms,
            window.buckets_checked,
            consumer_id,
            fence,
            self._maxlen,
            *layout.args(),
        ]
        script_keys = [
            part.output,
            part.dead,
            part.stats,
            keys.fence(partition, consumer_id),
            part.seen_clock,
        ]
        hold = _Hold(part.output, len(entries), self._wait_timeout_ms)
        attempt = partial(self._attempt, partition, script_keys, args, hold)
        try:
            reply, wait = self._retrier.call(attempt, on_error=self._after_error())
        except RetryGaveUp:
            return None
        self._give_up_at = None  # Redis took it: a later failure gets its own grace
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

    def _attempt(
        self, partition: int, script_keys: list[str], args: list[str | bytes | int], hold: _Hold
    ) -> tuple[list[Any], int]:
        """One script call for a partition's batch: its reply, and the replicas it waited for."""
        wait = self._waits_for(partition)
        reply = evalsha_packed(
            self._node(self._keys.partitions[partition].output),
            self._sha,
            self._source,
            script_keys,
            args,
            wait,
            self._wait_timeout_ms,
            partial(self._held, hold) if self._strict_wait else None,
        )
        return reply, wait

    def _after_error(self) -> Callable[[BaseException], None]:
        """What a batch's failed write does before its retry: on a cluster, read the layout
        again, so the retry goes to the replica that took over; once the consumer is stopping,
        give the batch up (RetryGaveUp) if Redis stays away for ``grace_s`` more. That time
        counts from the first failure of an outage for every batch it holds up: each batch
        retrying ``grace_s`` of its own, a consumer holding a few outlasted SHUTDOWN_GRACE and
        was killed."""

        def after(error: BaseException) -> None:
            if self._keys.cluster:
                reread_layout(self._client)
            if self._stop.is_set():
                self._give_up_at = self._give_up_at or time.monotonic() + self._grace_s
                if time.monotonic() >= self._give_up_at:
                    raise RetryGaveUp(self._retrier.outage.describe())

        return after

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
        self._log.warning(
            "%d of %d replicas confirmed a write to %s within %d ms: writing there "
            "without waiting for %g s (a failover now could lose what they lack)",
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
            self._log.warning(
                "holding %d messages written to %s: %d of %d replicas confirmed them within "
                "%d ms; waiting until they do (WAIT_REPLICAS_MODE=strict)",
                hold.messages,
                hold.stream,
                confirmed,
                self._wait_replicas,
                self._wait_timeout_ms,
            )
        elif now - hold.logged_at >= HOLD_LOG_INTERVAL_S:
            hold.logged_at = now
            self._log.warning(
                "still holding %d messages written to %s after %.0f s: %d of %d replicas "
                "confirmed them",
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
            self._log.warning(
                "%d held messages written to %s confirmed by %d of %d replicas after %.1f s",
                hold.messages,
                hold.stream,
                confirmed,
                self._wait_replicas,
                held_s,
            )
        else:
            self._log.warning(
                "stopping: %d held messages let go unconfirmed after %.1f s, %d of %d replicas "
                "confirmed them: they are written on the primary of %s, not lost, but a "
                "failover before its replicas catch up would lose them",
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


def dead_letter_time(now: float | None = None) -> str:
    """A dead letter's ``time``: UTC, ISO-8601 to the millisecond (``2026-12-03T10:01:44.123Z``),
    by the writing consumer's clock (the entry id has Redis's)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _ScriptLayout:
    """A batch as ``dedup_append.lua`` takes it: first occurrences of each dedup id, outputs then
    dead letters, digests first; repeats inside the batch are counted here as skipped."""

    def __init__(self, entries: Sequence[Entry], dead_time: str) -> None:
        self._output_digests: list[bytes] = []
        self._outputs: list[str | bytes] = []  # message_id, data
        self._dead_digests: list[bytes] = []
        # message_id, reason code, reason, raw, time
        self._dead: list[str | bytes] = []
        self._repeats = 0
        # Per dead letter of the batch, in order: its place among the dead letters sent, or
        # None for a repeat.
        self._dead_slots: list[int | None] = []
        firsts: set[bytes] = set()
        for entry in entries:
            key = digest(entry.dedup_id)
            if key in firsts:
                self._repeats += 1
                if entry.kind == DEAD:
                    self._dead_slots.append(None)
                continue
            firsts.add(key)
            if entry.kind == DEAD:
                self._dead_slots.append(len(self._dead_digests))
                self._dead_digests.append(key)
                self._dead += (entry.message_id, entry.code, entry.reason, entry.raw, dead_time)
            else:
                self._output_digests.append(key)
                self._outputs += (entry.dedup_id, entry.data)

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
