"""The report: the results table and the targets printed, bench.json and the chart saved."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from demo.benchmark.chart import draw_chart
from demo.benchmark.cost import Cost, Memory, cost_note
from demo.benchmark.measure import Run
from demo.benchmark.model import build_model, markdown
from demo.benchmark.plan import (
    ASYNC_IO_16,
    CPU,
    DEDUP,
    DEFAULTS,
    DOCS_CHART,
    IO,
    LOCKS,
    PIPELINES,
    RESULTS_DIR,
    ROOT,
    STRATEGIES,
    HandlerCase,
)
from demo.benchmark.scenarios import Results, latency_note

MANY_CONSUMERS = 8  # the targets compare 8 consumers with 1

HEADER = (
    *("scenario", "handler", "strategy", "cons", "conc"),
    *("offered msg/s", "written msg/s", "lost", "dup", "notes"),
)
NUMERIC_COLUMNS = {3, 4, 5, 6, 7, 8}


def cells(
    scenario: str,
    handler: str,
    strategy: str,
    consumers: int,
    concurrency: int,
    run: Run | None,
    note: str,
) -> tuple[str, ...]:
    figures = ("-",) * 4
    if run is not None:
        figures = (
            f"{run.offered_rate:,.0f}",
            f"{run.written_rate:,.0f}",
            f"{run.lost:,}",
            f"{run.duplicates:,}",
        )
    return (scenario, handler, strategy, str(consumers), str(concurrency), *figures, note)


def table_rows(results: Results) -> list[tuple[str, ...]]:
    plain = results.baseline
    rows = [cells("0 baseline", "trivial", "plain sub", 1, 1, plain.best, plain.end)]
    rows += [
        cells("1 max lossless", "trivial", label(r.strategy, r.path), r.consumers, 1, r.best, r.end)
        for r in results.ramps
    ]
    rows += [
        cells(
            f"{2 if d.handler == CPU.name else 3} drain",
            d.handler,
            d.strategy,
            d.consumers,
            d.concurrency,
            d.run,
            f"burst of {d.run.published:,}",
        )
        for d in results.drains
    ]
    rows += [
        cells("4 cost", "trivial", label(c.strategy, c.path), c.consumers, 1, c.run, cost_note(c))
        for c in results.costs
    ]
    rows += [
        cells(
            "5 latency",
            "trivial",
            label(x.strategy, x.path),
            x.consumers,
            1,
            x.run,
            latency_note(x),
        )
        for x in results.latencies
    ]
    rows += [
        cells(
            "6 memory",
            "trivial",
            label(c.strategy, c.path),
            c.consumers,
            1,
            c.run,
            memory_note(c.memory),
        )
        for c in results.costs
        if c.consumers == 1
    ]
    rows += [
        cells("7 overload", CPU.name, "partitioned", o.consumers, 1, o.run, f"{o.run.problems}")
        for o in results.overloads
    ]
    return rows


def label(strategy: str, path: str) -> str:
    """The strategy, and the write path when it is a baseline's."""
    return strategy if path == DEDUP else f"{strategy} [{path}]"


def memory_note(memory: Memory) -> str:
    per_member = memory.id_set_bytes
    return f"{memory.bytes_per_id:.0f} B per id in used_memory ({per_member:.0f} B in its set)"


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], numeric: set[int]) -> str:
    widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in rows)])


@dataclass(frozen=True)
class Target:
    """One target: a headline figure, per strategy, against a limit."""

    figure: str  # a key of headline()
    name: str
    limit: float
    at_least: bool  # True: the figure must reach the limit; False: stay within it
    unit: str = "x"

    @property
    def required(self) -> str:
        return f"{'>=' if self.at_least else '<='} {number(self.limit)}{self.unit}"

    def verdict(self, figure: float | None) -> str:
        if figure is None or math.isnan(figure):
            return "n/a"
        passed = figure >= self.limit if self.at_least else figure <= self.limit
        outcome = "PASS" if passed else f"MISS by {abs(figure - self.limit) / self.limit:.0%}"
        return f"{number(figure)}{self.unit} {outcome}"


TARGETS = (
    Target("best", "trivial: best sustained lossless written", 100_000, True, " msg/s"),
    Target("trivial_scaling", "trivial: 8 consumers / 1, lossless", 0.5, True),
    Target("cpu_2", "cpu_100us: 2 consumers / 1", 1.6, True),
    Target("cpu_many", "cpu_100us: 8 consumers / 1", 1.5, True),
    Target("io_many", "io_2ms: 8 consumers / 1", 6, True),
    Target("async_16", "1 consumer: async_io_2ms at concurrency 16 / io_2ms", 8, True),
    Target("commands", "Redis commands per msg: 8 consumers / 1", 1.1, False),
    Target("redis_cpu", "Redis CPU per msg: 8 consumers / 1", 1.4, False),
    Target("buffered", "consumer CPU per msg only read and buffered", 2, False, " µs"),
    Target("p99", "p99 latency at half the best rate", DEFAULTS.batch_window_ms + 25, False, " ms"),
    Target("overload_2", "cpu_100us offered 2x capacity: 2 consumers / 1", 1.6, True),
    Target("redis_vs_locks", "Redis CPU per msg / previous write's, worst of 1-8", 0.5, False),
    Target("write_vs_locks", "write command µs per msg / previous write's, worst", 0.5, False),
    Target("best_vs_locks", "best lossless / previous write's", 1.2, True),
    Target("best_vs_seed", "best lossless / seed write's", 3, True),
    Target("p99_vs_locks", "p99 / previous write's, same rate and consumers", 1, False),
)


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def headline(results: Results, strategy: str) -> dict[str, float | None]:
    """The figures the targets are about, for one strategy."""
    counts = results.plan.consumer_counts

    def lossless(consumers: int, path: str = DEDUP) -> float | None:
        found = results.ramp(strategy, consumers, path)
        if found is None:
            return None
        return found.best.written_rate if found.best else 0.0

    def drained(case: HandlerCase, consumers: int) -> float | None:
        found = results.drain(case, strategy, consumers)
        return found.run.written_rate if found else None

    def best(path: str) -> float | None:
        rates = [rate for n in counts if (rate := lossless(n, path)) is not None]
        return max(rates) if rates else None

    def p99(path: str) -> float | None:
        found = results.latency(strategy, path)
        return found.p99_ms if found else None

    def worst_vs_locks(figure: Callable[[Cost], float]) -> float | None:
        pairs = [(results.cost(strategy, n), results.cost(strategy, n, LOCKS)) for n in counts]
        ratios = [figure(ours) / figure(old) for ours, old in pairs if ours and old]
        return max(ratios) if ratios else None

    def overloaded(consumers: int) -> float | None:
        found = results.overload(consumers) if strategy == "partitioned" else None
        return found.run.written_rate if found else None

    one, many = results.cost(strategy, 1), results.cost(strategy, MANY_CONSUMERS)
    split = results.split if strategy == "partitioned" else None
    return {
        "best": best(DEDUP),
        "trivial_scaling": ratio(lossless(MANY_CONSUMERS), lossless(1)),
        "cpu_2": ratio(drained(CPU, 2), drained(CPU, 1)),
        "cpu_many": ratio(drained(CPU, MANY_CONSUMERS), drained(CPU, 1)),
        "io_many": ratio(drained(IO, MANY_CONSUMERS), drained(IO, 1)),
        "async_16": ratio(drained(ASYNC_IO_16, 1), drained(IO, 1)),
        "commands": ratio(many.commands_per_msg, one.commands_per_msg) if one and many else None,
        "redis_cpu": ratio(many.redis_us_per_msg, one.redis_us_per_msg) if one and many else None,
        "buffered": split.buffered_us if split else None,
        "p99": p99(DEDUP),
        "overload_2": ratio(overloaded(2), overloaded(1)),
        "redis_vs_locks": worst_vs_locks(lambda c: c.redis_us_per_msg),
        "write_vs_locks": worst_vs_locks(lambda c: c.write_us_per_msg),
        "best_vs_locks": ratio(best(DEDUP), best(LOCKS)),
        "best_vs_seed": ratio(best(DEDUP), best(PIPELINES)),
        "p99_vs_locks": ratio(p99(DEDUP), p99(LOCKS)),
    }


def target_lines(results: Results) -> list[tuple[str, ...]]:
    figures = {strategy: headline(results, strategy) for strategy in STRATEGIES}
    return [
        (
            target.name,
            target.required,
            *(target.verdict(figures[s][target.figure]) for s in STRATEGIES),
        )
        for target in TARGETS
    ]


TARGETS_HEADER = ("target", "required", *STRATEGIES)


def print_report(results: Results) -> None:
    meta = results.meta
    print()
    print(
        f"processor benchmark ({'quick' if meta['quick'] else 'full'}): {meta['cpus']} CPUs, "
        f"redis-server {meta['redis_version']}, Python {meta['python']}, "
        f"{meta['message_bytes']}-byte messages, wall time {meta['wall_s']:.0f} s, "
        f"load average {meta['load_start']:.1f} at start, {meta['load_end']:.1f} at end"
    )
    print()
    print(format_table(HEADER, table_rows(results), NUMERIC_COLUMNS))
    split = results.split
    if split is not None:
        print(
            f"\nconsumer CPU per message (partitioned, least squares over every consumer): "
            f"owned {split.owned_us:.1f} µs, only read and buffered {split.buffered_us:.1f} µs"
        )
    print()
    print(format_table(TARGETS_HEADER, target_lines(results), set()))
    model = build_model(results)
    if model is not None:
        print("\ncost model\n")
        print(markdown(model))


def write_json(results: Results, path: Path) -> None:
    document = asdict(results)
    document["targets"] = [
        dict(zip(TARGETS_HEADER, line, strict=True)) for line in target_lines(results)
    ]
    document["headline"] = {strategy: headline(results, strategy) for strategy in STRATEGIES}
    model = build_model(results)
    document["model"] = asdict(model) if model is not None else None
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save(results: Results, publish_chart: bool) -> None:
    write_json(results, RESULTS_DIR / "bench.json")
    chart = RESULTS_DIR / "throughput.png"
    draw_chart(results, chart)
    written = [RESULTS_DIR / "bench.json", chart]
    if publish_chart:
        DOCS_CHART.parent.mkdir(exist_ok=True)
        shutil.copyfile(chart, DOCS_CHART)
        written.append(DOCS_CHART)
    print("\nwrote " + ", ".join(str(path.relative_to(ROOT)) for path in written))
