"""Scenarios 4 and 6: Redis commands and CPU, consumer CPU and Redis memory per written message."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import redis

from demo.benchmark.daemon import consumer_pid, consumer_slot, daemon
from demo.benchmark.measure import (
    Bench,
    Run,
    outcome,
    process_cpu_us,
    publish_and_wait,
    redis_commands,
    redis_cpu_us,
    redis_write_us,
)
from demo.benchmark.plan import DEDUP, DEFAULTS, KEYS, LOCK_PREFIX, PIPELINES, TRIVIAL


@dataclass
class ConsumerCpu:
    consumer_id: str
    received: int
    written: int  # what this consumer owned (partitioned) or won the lock for (race)
    cpu_us: float


@dataclass
class Memory:
    used_delta_bytes: int  # INFO used_memory after - before
    stream_bytes: int  # MEMORY USAGE of the output stream
    bytes_per_id: float  # (used_delta - stream) / written
    id_set_bytes: float  # MEMORY USAGE of the dedup bucket sets, per id they hold


@dataclass
class Cost:
    strategy: str
    consumers: int
    run: Run
    commands_per_msg: float
    redis_us_per_msg: float
    write_us_per_msg: float  # INFO commandstats: the write's own commands
    consumer_us_per_msg: float  # all consumers together
    consumers_cpu: list[ConsumerCpu]
    memory: Memory
    path: str = DEDUP


def cost(bench: Bench, strategy: str, consumers: int, path: str = DEDUP) -> Cost:
    client = bench.client
    plan = bench.plan
    with daemon(bench, strategy, consumers, TRIVIAL, path) as ids:
        pids = [consumer_pid(consumer_id) for consumer_id in ids]
        client.config_resetstat()
        used_before = int(client.info("memory")["used_memory"])
        redis_before = redis_cpu_us(client)
        cpu_before = [process_cpu_us(pid) for pid in pids]
        published = publish_and_wait(bench, round(plan.cost_rate * plan.cost_s), plan.cost_rate)
        # Read before the bench's own XRANGE over the output adds to Redis's figures.
        cpu_after = [process_cpu_us(pid) for pid in pids]
        redis_after = redis_cpu_us(client)
        commands = redis_commands(client)
        write_us = redis_write_us(client, scripted=path != PIPELINES)
        used_delta = int(client.info("memory")["used_memory"]) - used_before
        run, output = outcome(bench, published)
        memory = measure_memory(client, used_delta, run.written, path)
    received = run.published - run.unreceived
    per_consumer = [
        ConsumerCpu(
            consumer_id,
            received if is_reader(strategy, consumer_id) else output.by_consumer[consumer_id],
            output.by_consumer[consumer_id],
            after - before,
        )
        for consumer_id, before, after in zip(ids, cpu_before, cpu_after, strict=True)
    ]
    written = max(run.written, 1)
    result = Cost(
        strategy=strategy,
        consumers=consumers,
        run=run,
        commands_per_msg=commands / written,
        redis_us_per_msg=(redis_after - redis_before) / written,
        write_us_per_msg=write_us / written,
        consumer_us_per_msg=sum(c.cpu_us for c in per_consumer) / written,
        consumers_cpu=per_consumer,
        memory=memory,
        path=path,
    )
    bench.progress(f"cost {strategy} {path} x{consumers}", run, cost_note(result))
    return result


def is_reader(strategy: str, consumer_id: str) -> bool:
    """Whether the consumer subscribes (reads every message) or is fed only its own."""
    return strategy == "race" or consumer_slot(consumer_id) < DEFAULTS.readers_per_host


def measure_memory(client: redis.Redis, used_delta: int, written: int, path: str) -> Memory:
    """``id_set_bytes``: the bucket sets per member (dedup), or the lock keys per key."""
    stream = int(client.memory_usage(KEYS.output, samples=0) or 0)
    per_id = (used_delta - stream) / max(written, 1)
    if path != DEDUP:
        locks = itertools.islice(client.scan_iter(match=LOCK_PREFIX + "*", count=1000), 1000)
        sizes = [int(client.memory_usage(key, samples=0) or 0) for key in locks]
        return Memory(used_delta, stream, per_id, sum(sizes) / max(len(sizes), 1))
    sets = list(client.scan_iter(match=KEYS.seen_prefix + "*"))
    members = sum(int(client.scard(key)) for key in sets)
    set_bytes = sum(int(client.memory_usage(key, samples=0) or 0) for key in sets)
    return Memory(used_delta, stream, per_id, set_bytes / max(members, 1))


def cost_note(cost: Cost) -> str:
    return (
        f"{cost.commands_per_msg:.2f} cmd/msg, Redis {cost.redis_us_per_msg:.1f} µs/msg "
        f"(writes {cost.write_us_per_msg:.1f}), "
        f"consumers {cost.consumer_us_per_msg:.1f} µs/msg"
    )


@dataclass
class CpuSplit:
    """Consumer CPU per message: one it owns, and one a reader only reads, buffers and
    forwards."""

    owned_us: float
    buffered_us: float


def fit_split(points: list[ConsumerCpu]) -> CpuSplit | None:
    """Least squares of cpu = owned * c_owned + buffered * c_buffered over every consumer."""
    pairs = [(p.written, p.received - p.written, p.cpu_us) for p in points]
    oo = sum(o * o for o, _, _ in pairs)
    ob = sum(o * b for o, b, _ in pairs)
    bb = sum(b * b for _, b, _ in pairs)
    oy = sum(o * y for o, _, y in pairs)
    by = sum(b * y for _, b, y in pairs)
    determinant = oo * bb - ob * ob
    if not determinant:
        return None  # one consumer count alone cannot tell the two apart
    return CpuSplit((oy * bb - by * ob) / determinant, (oo * by - ob * oy) / determinant)
