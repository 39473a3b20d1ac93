"""The throughput chart: written msg/s by consumer count, per handler and strategy."""

from __future__ import annotations

import math
from pathlib import Path

from demo.benchmark.plan import (
    ASYNC_IO,
    ASYNC_IO_16,
    BASELINE_PATHS,
    CPU,
    IO,
    PATH_LABELS,
    STRATEGIES,
    TRIVIAL,
)
from demo.benchmark.scenarios import Results


def chart_series(results: Results, strategy: str) -> dict[str, list[float]]:
    """Written msg/s by consumer count for each handler: scenario 1's best, 2 and 3's drains."""
    counts = results.plan.consumer_counts
    ramps = [results.ramp(strategy, n) for n in counts]
    series = {TRIVIAL.name: [r.best.written_rate if r and r.best else math.nan for r in ramps]}
    for case in results.plan.sweep:
        drains = [results.drain(case, strategy, n) for n in counts]
        series[case.name] = [d.run.written_rate if d else math.nan for d in drains]
    return series


def draw_chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = results.plan.consumer_counts
    colours = {TRIVIAL.name: "tab:blue", CPU.name: "tab:red", IO.name: "tab:green"}
    colours[ASYNC_IO.name] = "tab:purple"
    figure, axes = plt.subplots(figsize=(11, 5.5))
    for strategy, style in zip(STRATEGIES, ("-", "--"), strict=True):
        for name, values in chart_series(results, strategy).items():
            label = f"{name} ({strategy})"
            axes.plot(counts, values, style, marker="o", color=colours[name], label=label)
        concurrent = results.drain(ASYNC_IO_16, strategy, 1)
        if concurrent is not None:
            label = f"async_io_2ms, concurrency 16 ({strategy})"
            marker = "D" if strategy == "partitioned" else "d"
            axes.plot([1], [concurrent.run.written_rate], marker, color="tab:purple", label=label)
    for write_path, style in zip(BASELINE_PATHS, (":", "-."), strict=True):
        ramps = [results.ramp("partitioned", n, write_path) for n in counts]
        values = [r.best.written_rate if r and r.best else math.nan for r in ramps]
        label = f"{TRIVIAL.name} (partitioned, {PATH_LABELS[write_path]})"
        axes.plot(counts, values, style, marker="x", color="tab:gray", label=label)
    plain = results.baseline.best
    if plain is not None:
        label = "plain subscriber, no locks"
        axes.plot([1], [plain.written_rate], "k*", markersize=12, label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(counts, [str(n) for n in counts])
    axes.set_yscale("log")
    axes.set_xlabel("consumers")
    axes.set_ylabel("written msg/s")
    run = "quick run" if results.meta["quick"] else "full run"
    axes.set_title(f"processor: written msg/s by consumers ({results.meta['cpus']} CPUs, {run})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
