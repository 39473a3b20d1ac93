"""What Redis spends per message in the exactly-once write, three designs side by side.

``python demo/write_bench.py [--messages N] [--rounds R]``. Starts a throwaway redis-server and
writes the same batches (100 messages of about 150 bytes of JSON each, unique ids) through:

- ``dedup``: today's ``processor/store/lua/dedup_append.lua``, through the daemon's own ``Writer``;
- ``locks``: the previous script, a ``SET NX PX`` lock key per id then ``XADD`` if won
  (``demo/benchmark/lock_and_append.lua``, kept here as the baseline);
- ``pipelines``: the seed's design, a pipeline of ``SET NX PX`` then a pipeline of ``XADD`` for
  the locks won (not atomic: a crash between the two loses the batch);
- ``lookups``: today's script without its ``SADD``: it checks every id against the bucket sets
  (filled by today's script beforehand) but remembers none (not exactly once: a reference that
  splits today's cost between looking ids up and remembering them);
- ``append``: the same appends with no deduplication at all, the floor of any design that
  appends one stream entry per message (not exactly once: a reference only).

Each round flushes Redis, resets its statistics and writes every batch once (all new), then
once more (all already written, as after a takeover). It prints Redis's own CPU per message
(``INFO cpu``, what the machine pays: parsing, networking and execution), the time Redis
accounts to the commands (``INFO commandstats``: the script calls, or the pipelined commands),
and the memory each design keeps per remembered id, with the ratios to ``locks``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.benchmark.plan import LOCK_PREFIX
from demo.redis_server import RedisServer, exit_cleanly_on_sigterm
from processor.config import Settings
from processor.consumer.messages import OUTPUT, Entry
from processor.consumer.writer import Writer
from processor.observe.logs import Tagged
from processor.store.connection import command_client
from processor.store.keys import Keys
from processor.store.scripts import load_script

BATCH = 100
CONSUMER = "bench-consumer"
BASELINE = Path(__file__).resolve().parent / "benchmark" / "lock_and_append.lua"
# Taken out of today's script for the ``lookups`` reference.
NO_INSERT = "redis.call('SADD', key, unpack(ARGV, first, last))"
# The floor: the same appends with no deduplication at all (not exactly once; a reference).
APPEND_ONLY = """
for i = 2, #ARGV, 2 do
    redis.call('XADD', KEYS[1], '*', 'message_id', ARGV[i], 'consumer_id', ARGV[1],
        'data', ARGV[i + 1])
end
return #ARGV
"""

UNTAGGED = Tagged(logging.getLogger(__name__), str)


def make_batches(count: int, prefix: str = "") -> list[list[Entry]]:
    entries = []
    for n in range(count):
        message_id = f"{prefix}{n:08d}-" + hashlib.md5(str(n).encode()).hexdigest()[:27]
        body = {"message_id": message_id, "text": "x" * 64, "published_at": 1.7e9, "score": 0.42}
        entries.append(Entry(OUTPUT, message_id, orjson.dumps(body).decode()))
    return [entries[start : start + BATCH] for start in range(0, count, BATCH)]


class Design:
    def __init__(self, name: str, client: redis.Redis, keys: Keys, window_ms: int) -> None:
        self.name = name
        self._window_ms = window_ms
        self._client = client
        self._keys = keys
        self._write: Callable[[list[Entry]], Any]
        writer = Writer(client, keys, window_ms, 1.0, UNTAGGED, threading.Event(), 1.0)
        # What fills the window before the measured batches: the design itself, except for
        # ``lookups``, which looks up what today's script remembered.
        self.prefill: Callable[[list[Entry]], Any] = self.write
        if name == "dedup":
            self._write = lambda batch: writer.write(batch, CONSUMER, "")
        elif name == "lookups":
            source = load_script("dedup_append.lua")
            assert NO_INSERT in source, "the bench's copy of the script's SADD is out of date"
            with mock.patch(
                "processor.consumer.writer.load_script",
                return_value=source.replace(NO_INSERT, ""),
            ):
                checker = Writer(client, keys, window_ms, 1.0, UNTAGGED, threading.Event(), 1.0)
            self._write = lambda batch: checker.write(batch, CONSUMER, "")
            self.prefill = lambda batch: writer.write(batch, CONSUMER, "")
        elif name == "locks":
            script = client.register_script(BASELINE.read_text())
            # ARGV as that script took it (its last version: with MAXLEN 0 in ARGV[5]).
            self._write = lambda batch: script(
                keys=[keys.output, keys.dead, keys.stats, keys.heartbeat(CONSUMER)],
                args=[LOCK_PREFIX, window_ms, CONSUMER, "", 0]
                + [
                    value
                    for e in batch
                    for value in (e.kind, e.dedup_id, e.data or e.reason, e.raw)
                ],
            )
        elif name == "append":
            script = client.register_script(APPEND_ONLY)
            self._write = lambda batch: script(
                keys=[keys.output],
                args=[CONSUMER] + [value for e in batch for value in (e.dedup_id, e.data)],
            )
        else:
            self._write = self._pipelines

    def write(self, batch: list[Entry]) -> None:
        self._write(batch)

    def _pipelines(self, batch: list[Entry]) -> None:
        keys = self._keys
        with self._client.pipeline(transaction=False) as pipe:
            for entry in batch:
                pipe.set(LOCK_PREFIX + entry.dedup_id, 1, nx=True, px=self._window_ms)
            won = pipe.execute()
        with self._client.pipeline(transaction=False) as pipe:
            for entry, ok in zip(batch, won, strict=True):
                if ok:
                    pipe.xadd(
                        keys.output,
                        {"message_id": entry.dedup_id, "consumer_id": CONSUMER, "data": entry.data},
                    )
            pipe.execute()


def cpu_s(client: redis.Redis) -> float:
    info: Any = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_us(client: redis.Redis, design: str) -> float:
    stats: Any = client.info("commandstats")
    if design == "pipelines":
        return sum(
            float(v["usec"]) for k, v in stats.items() if k in ("cmdstat_set", "cmdstat_xadd")
        )
    # Commands run inside a script are counted twice (alone and in the script's time).
    return sum(
        float(v["usec"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
    )


def dedup_bytes_per_id(client: redis.Redis, keys: Keys) -> float:
    """Memory per remembered id: lock keys sampled, or the bucket sets whole."""
    found = client.scan_iter(match=LOCK_PREFIX + "*")
    locks = [key for _, key in zip(range(2000), found, strict=False)]
    if locks:
        return statistics.mean(client.memory_usage(key, samples=0) or 0 for key in locks)
    sets = list(client.scan_iter(match=keys.seen_prefix + "*"))
    members = sum(int(client.scard(key)) for key in sets)
    return sum(client.memory_usage(key, samples=0) or 0 for key in sets) / max(members, 1)


def measure(
    design: Design,
    client: redis.Redis,
    keys: Keys,
    batches: list[list[Entry]],
    prefill: list[list[Entry]],
) -> dict[str, float]:
    count = sum(len(batch) for batch in batches)
    client.flushall()
    # A window already full of remembered ids, as in a daemon that has run for a while.
    for batch in prefill:
        design.prefill(batch)
    client.delete(keys.output)
    before_memory = float(client.info("memory")["used_memory"])
    results: dict[str, float] = {}
    # All new, then the last tenth again (all already written, as after a takeover; recent
    # enough to be inside the window).
    phases = [("new", batches), ("seen", batches[-max(1, len(batches) // 10) :])]
    if design.name in ("append", "lookups"):
        phases = phases[:1]  # they would append them again
    for phase, sent in phases:
        sent_count = sum(len(batch) for batch in sent)
        client.config_resetstat()
        started_cpu, started = cpu_s(client), time.perf_counter()
        for batch in sent:
            design.write(batch)
        elapsed = time.perf_counter() - started
        results[f"{phase}_cpu_us"] = (cpu_s(client) - started_cpu) * 1e6 / sent_count
        results[f"{phase}_cmd_us"] = command_us(client, design.name) / sent_count
        results[f"{phase}_rate"] = sent_count / elapsed
        if phase == "new":
            results["used_memory_b"] = (
                float(client.info("memory")["used_memory"]) - before_memory
            ) / count
        assert client.xlen(keys.output) == count, f"{design.name}: {client.xlen(keys.output)}"
    # ``lookups`` remembers nothing: the sets are the prefill's.
    results["dedup_b"] = math.nan if design.name == "lookups" else dedup_bytes_per_id(client, keys)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--prefill",
        type=int,
        default=600_000,
        help="ids written before the measured batches, so the window is full and turning over",
    )
    parser.add_argument(
        "--window-ms",
        type=int,
        default=10_000,
        help="the dedup window (DEDUP_WINDOW_MS) of every design: short, so that expiry (a lock "
        "key per id, or a bucket's set) is part of what is measured, as in a long-running daemon",
    )
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    server = RedisServer()
    server.start()
    try:
        client = command_client(Settings(redis_url=server.url), name="write-bench")
        version = client.info("server")["redis_version"]
        keys = Keys.from_settings(Settings(redis_url=server.url))
        batches = make_batches(args.messages)
        prefill = make_batches(args.prefill, prefix="pre-")
        designs = [
            Design(name, client, keys, args.window_ms)
            for name in ("dedup", "locks", "pipelines", "lookups", "append")
        ]
        samples: dict[str, list[dict[str, float]]] = {d.name: [] for d in designs}
        for _ in range(args.rounds):
            for design in designs:  # interleaved, so drift hits every design alike
                samples[design.name].append(measure(design, client, keys, batches, prefill))
        print(
            f"write bench: redis {version}, {args.messages:,} messages in batches of {BATCH} "
            f"after {args.prefill:,} already written, window {args.window_ms / 1000:g} s, "
            f"{args.rounds} rounds (medians)"
        )
        header = (
            f"{'design':<10} {'Redis CPU us/msg':>17} {'cmd us/msg':>11} {'all-seen CPU':>13} "
            f"{'used_memory B/msg':>18} {'dedup B/id':>11} {'msg/s':>9} {'CPU vs locks':>13}"
        )
        print(header)
        medians = {
            name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
            for name, runs in samples.items()
        }
        base = medians["locks"]["new_cpu_us"]
        for name, m in medians.items():
            row = f"{name:<10} {m['new_cpu_us']:>17.2f} {m['new_cmd_us']:>11.2f} "
            row += f"{m.get('seen_cpu_us', math.nan):>13.2f} {m['used_memory_b']:>18.0f} "
            row += f"{m['dedup_b']:>11.1f} "
            print(row + f"{m['new_rate']:>9,.0f} {m['new_cpu_us'] / base:>12.2f}x")
        client.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
