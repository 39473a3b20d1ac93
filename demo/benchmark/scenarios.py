"""Scenarios 0, 1, 2, 3 and 5 (ramp, drain, latency), and the whole run in order into Results."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import redis

from demo.benchmark.cost import Cost, CpuSplit, cost, fit_split
from demo.benchmark.daemon import daemon, plain_subscriber
from demo.benchmark.measure import Bench, Run, flush, measure, process_cpu_us, reset_output
from demo.benchmark.plan import (
    ASYNC_IO_16,
    BASELINE_PATHS,
    CPU,
    DEDUP,
    RESULTS_DIR,
    STRATEGIES,
    TRIVIAL,
    HandlerCase,
    Plan,
)
from demo.benchmark.publishing import PublishJob, message_heads, publisher_process
from demo.redis_server import RedisServer

# A burst is published as fast as possible and waits in Redis and in the consumers' sockets and
# inboxes: keep it well under the 8 MB soft Pub/Sub output buffer limit (about 190 B a message).
BURST_MAX = 40_000
OVERLOAD_CONSUMERS = (1, 2)
PUBLISHER_NAME = "bench-publisher"  # the name publishing.publisher_process gives its process


# -- scenarios 0 and 1: the highest sustained lossless rate -------------------------------------


@dataclass
class Ramp:
    """The offered rate stepped up until a step is not sustained or the publisher tops out."""

    strategy: str  # or "plain" for the baseline
    consumers: int
    steps: list[Run]
    path: str = DEDUP

    @property
    def best(self) -> Run | None:
        return max(
            (s for s in self.steps if s.sustained), key=lambda s: s.written_rate, default=None
        )

    @property
    def end(self) -> str:
        last = self.steps[-1]
        if last.problems:
            return f"at {last.target_rate:,.0f}/s: {last.problems}"
        if last.lagged:
            return f"at {last.target_rate:,.0f}/s: lagged {last.drain_s:.2f} s behind"
        if last.publisher_limited:
            return f"publisher reached {last.offered_rate:,.0f} of {last.target_rate:,.0f}/s"
        return "top of the ramp reached"


def ramp(
    bench: Bench,
    strategy: str,
    consumers: int,
    runner: contextlib.AbstractContextManager[Any],
    path: str = DEDUP,
) -> Ramp:
    steps: list[Run] = []
    with runner:
        for rate in bench.plan.ramp_rates:
            reset_output(bench.client)
            run, _ = measure(bench, round(rate * bench.plan.step_s), rate)
            steps.append(run)
            bench.progress(
                f"ramp {strategy} {path} x{consumers} @{rate:,}/s",
                run,
                f"lag {run.drain_s:.2f} s {run.problems}",
            )
            if not run.sustained or run.publisher_limited:
                break
    return Ramp(strategy, consumers, steps, path)


def baseline(bench: Bench) -> Ramp:
    flush(bench.client)
    return ramp(bench, "plain", 1, plain_subscriber(bench))


def max_lossless(bench: Bench, strategy: str, consumers: int, path: str = DEDUP) -> Ramp:
    runner = daemon(bench, strategy, consumers, TRIVIAL, path)
    return ramp(bench, strategy, consumers, runner, path)


# -- scenarios 2 and 3: drain rate of a burst ---------------------------------------------------


@dataclass
class Drain:
    handler: str
    strategy: str
    consumers: int
    concurrency: int
    run: Run


def burst_size(case: HandlerCase, strategy: str, consumers: int, work_s: float) -> int:
    """About ``work_s`` of work at the drain rate we expect."""
    workers = 1 if strategy == "race" else consumers
    if case.cpu_bound:
        workers = min(workers, os.cpu_count() or 1)
    return min(BURST_MAX, max(100, int(round(case.capacity * workers * work_s, -2))))


def drain(bench: Bench, case: HandlerCase, strategy: str, consumers: int) -> Drain:
    count = burst_size(case, strategy, consumers, bench.plan.work_s)
    with daemon(bench, strategy, consumers, case):
        run, _ = measure(bench, count, 0)
    label = f"drain {case.name} c{case.concurrency} {strategy} x{consumers}"
    bench.progress(label, run, f"burst {count:,}")
    return Drain(case.name, strategy, consumers, case.concurrency, run)


# -- overload: a CPU-bound handler offered twice what the group drains ---------------------------


@dataclass
class Overload:
    consumers: int
    run: Run


def overload(bench: Bench, consumers: int) -> Overload:
    """The cpu_100us handler, partitioned, a long burst offered at a fixed rate above capacity.

    Unlike the drain bursts, which are published as fast as the publisher goes and then drained,
    the offered rate here lasts as long as the burst: the consumers read while they are behind.
    """
    plan = bench.plan
    with daemon(bench, "partitioned", consumers, CPU):
        run, _ = measure(bench, plan.overload_messages, plan.overload_rate)
    bench.progress(f"overload cpu_100us partitioned x{consumers}", run)
    return Overload(consumers, run)


# -- scenario 5: latency at half the best rate -------------------------------------------------


@dataclass
class Latency:
    strategy: str
    consumers: int
    run: Run
    p50_ms: float
    p99_ms: float
    max_ms: float
    path: str = DEDUP


def percentile(ordered: list[int], share: float) -> float:
    return float(ordered[max(0, math.ceil(share * len(ordered)) - 1)]) if ordered else math.nan


def latency(
    bench: Bench, strategy: str, best: Ramp, path: str = DEDUP, rate: float | None = None
) -> Latency | None:
    """At half the best rate of ``best``, with its consumer count; or at ``rate`` if given."""
    top = best.best
    if top is None:
        return None
    rate = round(top.offered_rate / 2, -3) if rate is None else rate
    with daemon(bench, strategy, best.consumers, TRIVIAL, path):
        run, output = measure(bench, round(rate * bench.plan.latency_s), rate, latency=True)
    ordered = sorted(output.latencies_ms)
    result = Latency(
        strategy,
        best.consumers,
        run,
        percentile(ordered, 0.5),
        percentile(ordered, 0.99),
        percentile(ordered, 1.0),
        path,
    )
    label = f"latency {strategy} {path} x{best.consumers} @{rate:,.0f}/s"
    bench.progress(label, run, latency_note(result))
    return result


def latency_note(result: Latency) -> str:
    return f"p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, max {result.max_ms:.0f} ms"


# -- the whole run -------------------------------------------------------------------------------


@dataclass
class Results:
    plan: Plan
    meta: dict[str, Any]
    baseline: Ramp
    ramps: list[Ramp]
    latencies: list[Latency]
    drains: list[Drain]
    costs: list[Cost]
    split: CpuSplit | None
    overloads: list[Overload]
    publisher_us_per_msg: float | None = None  # the publisher's CPU in scenario 4

    def ramp(self, strategy: str, consumers: int, path: str = DEDUP) -> Ramp | None:
        key = (strategy, consumers, path)
        return next((r for r in self.ramps if (r.strategy, r.consumers, r.path) == key), None)

    def drain(self, case: HandlerCase, strategy: str, consumers: int) -> Drain | None:
        key = (case.name, case.concurrency, strategy, consumers)
        return next(
            (d for d in self.drains if (d.handler, d.concurrency, d.strategy, d.consumers) == key),
            None,
        )

    def cost(self, strategy: str, consumers: int, path: str = DEDUP) -> Cost | None:
        key = (strategy, consumers, path)
        return next((c for c in self.costs if (c.strategy, c.consumers, c.path) == key), None)

    def latency(self, strategy: str, path: str = DEDUP) -> Latency | None:
        return next((x for x in self.latencies if (x.strategy, x.path) == (strategy, path)), None)

    def overload(self, consumers: int) -> Overload | None:
        return next((o for o in self.overloads if o.consumers == consumers), None)


def run_all(bench: Bench) -> Results:
    counts = bench.plan.consumer_counts
    print("0 baseline: plain subscriber", flush=True)
    plain = baseline(bench)
    print("1 trivial handler: highest sustained lossless rate", flush=True)
    ramps = [max_lossless(bench, s, n) for n in counts for s in STRATEGIES]
    # The write paths the daemon's replaced, same messages and consumer counts, partitioned.
    ramps += [max_lossless(bench, "partitioned", n, p) for n in counts for p in BASELINE_PATHS]
    print("5 latency at half the best rate", flush=True)
    latencies: list[Latency] = []
    for strategy in STRATEGIES:
        best = best_ramp([r for r in ramps if (r.strategy, r.path) == (strategy, DEDUP)])
        found = latency(bench, strategy, best)
        if found is None:
            continue
        latencies.append(found)
        if strategy == "partitioned":
            # The baselines at the same rate and consumer count, for a like-for-like p99.
            for path in BASELINE_PATHS:
                same = latency(bench, strategy, best, path, found.run.target_rate)
                latencies += [same] if same is not None else []
    print("2, 3 drain rate of a burst", flush=True)
    drains = [
        drain(bench, case, s, n) for case in bench.plan.sweep for n in counts for s in STRATEGIES
    ]
    drains += [drain(bench, ASYNC_IO_16, s, 1) for s in STRATEGIES]
    print("7 overload: cpu_100us offered twice what one consumer drains", flush=True)
    overloads = [overload(bench, n) for n in OVERLOAD_CONSUMERS]
    print(f"4, 6 cost per message at {bench.plan.cost_rate:,} msg/s", flush=True)
    publisher_before = publisher_cpu_us()
    costs = [cost(bench, s, n) for n in counts for s in STRATEGIES]
    costs += [cost(bench, "partitioned", n, p) for n in counts for p in BASELINE_PATHS]
    publisher_after = publisher_cpu_us()
    points = [
        c
        for cost_ in costs
        if (cost_.strategy, cost_.path) == ("partitioned", DEDUP)
        for c in cost_.consumers_cpu
    ]
    split = fit_split(points)
    results = Results(bench.plan, {}, plain, ramps, latencies, drains, costs, split, overloads)
    published = sum(c.run.published for c in costs)
    if publisher_before is not None and publisher_after is not None and published:
        results.publisher_us_per_msg = (publisher_after - publisher_before) / published
    return results


def publisher_cpu_us() -> float | None:
    """CPU time the publisher process has used so far (it idles between jobs), if found."""
    pids = [p.pid for p in multiprocessing.active_children() if p.name == PUBLISHER_NAME]
    return process_cpu_us(pids[0]) if pids and pids[0] is not None else None


def best_ramp(ramps: list[Ramp]) -> Ramp:
    return max(ramps, key=lambda r: r.best.written_rate if r.best else 0.0)


def machine_meta(quick: bool, client: redis.Redis) -> dict[str, Any]:
    sample = message_heads(PublishJob(1, 0, "m1"))[0] + b"%d}" % (time.time_ns() // 1_000_000)
    return {
        "quick": quick,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_version": client.info("server")["redis_version"],
        "message_bytes": len(sample),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure_everything(plan: Plan, quick: bool) -> Results:
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    with (
        RedisServer() as server,
        publisher_process(server.url) as publisher,
        open(RESULTS_DIR / "daemon.log", "w", encoding="utf-8") as log,
    ):
        bench = Bench(plan, server.url, publisher, log)
        meta = machine_meta(quick, bench.client)
        results = run_all(bench)
        bench.client.close()
    meta |= {"wall_s": time.monotonic() - started, "load_start": load_start}
    results.meta = meta | {"load_end": os.getloadavg()[0]}
    return results
