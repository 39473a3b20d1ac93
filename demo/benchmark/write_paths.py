"""The bench's baseline write paths, run inside the real daemon so every other cost is the same.

The daemon writes through ``processor/store/lua/dedup_append.lua``. To measure it against the
designs it replaced in the same run, with the same messages and consumer counts, the bench starts
the daemon with ``HANDLER=demo.benchmark.write_paths:add_random_score`` (the default handler) and
``BENCH_WRITE_PATH`` naming a baseline. Importing this module (which each consumer does when it
loads its handler) then swaps ``Writer.write`` for that baseline:

- ``locks``: the previous script, a ``SET NX PX`` lock key per id then ``XADD`` if won, in one
  atomic call (``demo/benchmark/lock_and_append.lua``);
- ``pipelines``: the seed's design, a pipeline of ``SET NX PX``, then a pipeline of ``XADD`` for
  the locks won (not atomic, no fence: a crash between the two loses the batch).

Both keep the daemon's retry on connection errors; the bench injects no faults.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from demo.benchmark.plan import DEDUP, LOCK_PREFIX, LOCKS, PIPELINES, WRITE_PATH_ENV
from processor.consumer.messages import OUTPUT, Entry
from processor.consumer.writer import Writer, WriteResult, evalsha_packed
from processor.handlers import add_random_score
from processor.store.connection import CONNECTION_ERRORS

LOCK_SCRIPT = (Path(__file__).resolve().parent / "lock_and_append.lua").read_text()
LOCK_SHA = hashlib.sha1(LOCK_SCRIPT.encode()).hexdigest()
RETRY_S = 0.05

__all__ = ["add_random_score"]


def write_with_locks(
    self: Writer, entries: Sequence[Entry], consumer_id: str, fence: str
) -> WriteResult | None:
    keys = self._keys
    ttl_ms = self._window.width_ms * self._window.buckets_checked
    args: list[Any] = [LOCK_PREFIX, ttl_ms, consumer_id, fence, self._maxlen]
    for entry in entries:
        args.extend((entry.kind, entry.dedup_id, entry.data or entry.reason, entry.raw))
    script_keys = [keys.output, keys.dead, keys.stats, keys.heartbeat(consumer_id)]
    while True:
        try:
            reply = evalsha_packed(self._client, LOCK_SHA, LOCK_SCRIPT, script_keys, args)
        except CONNECTION_ERRORS:
            time.sleep(RETRY_S)
            continue
        written, dead, skipped = (int(value) for value in reply[:3])
        if written < 0:
            return WriteResult(0, 0, 0, fenced=True)
        return WriteResult(written, dead, skipped, dead_flags=reply[3].decode())


def write_with_pipelines(
    self: Writer, entries: Sequence[Entry], consumer_id: str, fence: str
) -> WriteResult | None:
    keys = self._keys
    ttl_ms = self._window.width_ms * self._window.buckets_checked
    while True:
        try:
            locks = self._client.pipeline(transaction=False)
            for entry in entries:
                locks.set(LOCK_PREFIX + entry.dedup_id, 1, nx=True, px=ttl_ms)
            won = locks.execute()
            appends = self._client.pipeline(transaction=False)
            written = dead = 0
            dead_flags = []
            for entry, taken in zip(entries, won, strict=True):
                if entry.kind == OUTPUT:
                    if taken:
                        fields: dict[Any, Any] = {
                            "message_id": entry.dedup_id,
                            "consumer_id": consumer_id,
                            "data": entry.data,
                        }
                        appends.xadd(keys.output, fields)
                        written += 1
                else:
                    dead_flags.append("1" if taken else "0")
                    if taken:
                        letter: dict[Any, Any] = {
                            "reason": entry.reason,
                            "raw": entry.raw,
                            "consumer_id": consumer_id,
                        }
                        appends.xadd(keys.dead, letter)
                        dead += 1
            appends.execute()
        except CONNECTION_ERRORS:
            time.sleep(RETRY_S)
            continue
        skipped = len(entries) - written - dead
        return WriteResult(written, dead, skipped, dead_flags="".join(dead_flags))


_BASELINES = {LOCKS: write_with_locks, PIPELINES: write_with_pipelines}
_chosen = os.environ.get(WRITE_PATH_ENV, DEDUP)
if _chosen in _BASELINES:
    Writer.write = _BASELINES[_chosen]  # type: ignore[method-assign]
