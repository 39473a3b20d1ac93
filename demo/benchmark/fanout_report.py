"""The fan-out bench's figures: medians per consumer count and tree, the targets, the table."""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from demo.benchmark.fanout import Sample

TREES = ("baseline", "current")
METRICS = ("drain_rate", "redis_us", "daemon_us")
METRIC_LABELS = {
    "drain_rate": "drain rate",
    "redis_us": "Redis CPU per message",
    "daemon_us": "daemon CPU per message",
}


@dataclass(frozen=True)
class Median:
    """The median of each figure over the rounds of one consumer count and tree."""

    tree: str
    consumers: int
    drain_rate: float
    redis_us: float
    daemon_us: float
    others_cores: float
    rounds: int
    problems: str  # every round's losses or duplicates, "" when none


@dataclass(frozen=True)
class Target:
    """A ratio between consumer counts the design is held to, for one tree."""

    metric: str
    consumers: int
    against: int
    bound: float
    at_least: bool  # drain rates must reach the bound, CPU costs stay under it

    @property
    def label(self) -> str:
        sign = ">=" if self.at_least else "<="
        figures = f"{self.consumers} vs {self.against}"
        return f"{METRIC_LABELS[self.metric]}, {figures}, {sign} {self.bound}x"

    def met(self, ratio: float) -> bool:
        compare: Callable[[float, float], bool] = operator.ge if self.at_least else operator.le
        return not math.isnan(ratio) and compare(ratio, self.bound)


TARGETS = (
    Target("drain_rate", 10, 2, 1.0, at_least=True),
    Target("redis_us", 10, 2, 1.1, at_least=False),
    Target("daemon_us", 10, 2, 1.25, at_least=False),
    # "16 consumers no worse": no worse than 10 on every figure.
    Target("drain_rate", 16, 10, 1.0, at_least=True),
    Target("redis_us", 16, 10, 1.0, at_least=False),
    Target("daemon_us", 16, 10, 1.0, at_least=False),
)


def medians(samples: Iterable[Sample]) -> dict[tuple[str, int], Median]:
    grouped: dict[tuple[str, int], list[Sample]] = {}
    for sample in samples:
        grouped.setdefault((sample.tree, sample.consumers), []).append(sample)
    return {
        key: Median(
            tree=key[0],
            consumers=key[1],
            drain_rate=statistics.median(s.drain_rate for s in runs),
            redis_us=statistics.median(s.redis_us for s in runs),
            daemon_us=statistics.median(s.daemon_us for s in runs),
            others_cores=statistics.median(s.others_cores for s in runs),
            rounds=len(runs),
            problems="; ".join(f"round {s.round}: {s.problems}" for s in runs if s.problems),
        )
        for key, runs in grouped.items()
    }


def figure(table: dict[tuple[str, int], Median], tree: str, consumers: int, metric: str) -> float:
    median = table.get((tree, consumers))
    return float(getattr(median, metric)) if median else math.nan


def ratio(numerator: float, denominator: float) -> float:
    if math.isnan(numerator) or math.isnan(denominator) or not denominator:
        return math.nan
    return numerator / denominator


def target_ratio(table: dict[tuple[str, int], Median], tree: str, target: Target) -> float:
    return ratio(
        figure(table, tree, target.consumers, target.metric),
        figure(table, tree, target.against, target.metric),
    )


def versus_baseline(table: dict[tuple[str, int], Median], consumers: int, metric: str) -> float:
    return ratio(
        figure(table, "current", consumers, metric), figure(table, "baseline", consumers, metric)
    )


def fmt_ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def verdict(target: Target, value: float) -> str:
    if math.isnan(value):
        return "not measured"
    return "met" if target.met(value) else "MISSED"


def report_lines(table: dict[tuple[str, int], Median], counts: Iterable[int]) -> list[str]:
    """The figures by consumer count and tree, then the targets and the ratios to the baseline.

    ``others``: cores busy outside the bench during the burst, the noise under the figures.
    """
    counts = sorted(counts)
    lines = [
        f"{'consumers':>9}  {'tree':<8}  {'drain msg/s':>11}  {'Redis µs/msg':>12}"
        f"  {'daemon µs/msg':>13}  {'others':>6}  {'vs baseline: drain / Redis / daemon':<36}"
        "  problems",
    ]
    for consumers in counts:
        for tree in TREES:
            median = table.get((tree, consumers))
            if median is None:
                continue
            versus = ""
            if tree == "current":
                versus = " / ".join(
                    fmt_ratio(versus_baseline(table, consumers, m)) for m in METRICS
                )
            lines.append(
                f"{consumers:>9}  {tree:<8}  {median.drain_rate:>11,.0f}  {median.redis_us:>12.2f}"
                f"  {median.daemon_us:>13.2f}  {median.others_cores:>6.2f}  {versus:<36}"
                f"  {median.problems or '-'}"
            )
    lines += ["", f"{'target':<46}  {'baseline':>18}  {'current':>18}"]
    for target in TARGETS:
        cells = []
        for tree in TREES:
            value = target_ratio(table, tree, target)
            cells.append(f"{fmt_ratio(value)} {verdict(target, value)}")
        lines.append(f"{target.label:<46}  {cells[0]:>18}  {cells[1]:>18}")
    return lines


def draw_chart(table: dict[tuple[str, int], Median], title: str, path: Path) -> None:
    """Drain rate, and CPU per message (Redis and the daemon), against consumers, per tree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({consumers for _, consumers in table})
    figure_, (drains, costs) = plt.subplots(1, 2, figsize=(12, 5))
    for tree, colour in zip(TREES, ("tab:gray", "tab:blue"), strict=True):

        def values(metric: str, tree: str = tree) -> list[float]:
            return [figure(table, tree, n, metric) for n in counts]

        drains.plot(counts, values("drain_rate"), "-o", color=colour, label=tree)
        costs.plot(counts, values("redis_us"), "-o", color=colour, label=f"Redis ({tree})")
        costs.plot(counts, values("daemon_us"), "--s", color=colour, label=f"daemon ({tree})")
    for axes, label in ((drains, "drain msg/s"), (costs, "CPU µs per message")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts, [str(n) for n in counts])
        axes.set_xlabel("consumers")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure_.suptitle(title)
    figure_.tight_layout()
    figure_.savefig(path, dpi=110)
    plt.close(figure_)
