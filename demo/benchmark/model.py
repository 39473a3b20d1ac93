"""The cost model of the README's "Scaling out": CPU µs per message per component, from this run.

Partitioned, only readers subscribe: S = min(N, READERS_PER_HOST x hosts) subscriptions (race:
every consumer, S = N). A group writes at the least of four bounds. Consumers: a message costs
the group c_owned + h once and c_buf on each reader that does not own it (race: c_owned + h on
every consumer), spread over at most min(N, cores) cores. Readers: each reads every message, so
one core must carry c_buf for those it does not own and c_owned + h for its own share. Redis: one
core at r(S) = r1 + r_sub (S - 1) per message. CPU: on a shared host, Redis, publisher and
consumers together within its cores.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from demo.benchmark.plan import CPU, DEDUP, DEFAULTS, STRATEGIES, TRIVIAL
from demo.benchmark.scenarios import Results

# Measured on this project's machine: pipelines of 1000 PUBLISH, messages built in advance.
PUBLISHER_FACT_US = 3.5
HANDLER_US = {TRIVIAL.name: 0.0, CPU.name: 100.0}  # what the handler adds to an owned message
BIG_HOST_CORES = 16
HOST_CONSUMERS = (1, 2, 4, 8, 16, 32, 64)  # the several-hosts table
CONSUMERS_PER_HOST = 4  # in that table: hosts of 4 cores, a consumer on each
MAX_CONSUMERS = 256
CHECK_HEADER = ("handler", "strategy", "N", "predicted msg/s", "bound", "measured msg/s", "error")


@dataclass(frozen=True)
class Costs:
    """CPU µs per written message, per component."""

    redis_1: float  # r1: redis-server with one subscriber
    redis_sub: float  # r_sub: what each further subscriber adds (fan-out; race: lock calls too)
    owned: float  # c_owned: a consumer, for a message it owns (read, validate, process, write)
    buffered: float  # c_buf: a reader, for a message it only reads, buffers and forwards
    publisher: float
    publisher_source: str
    readers: int  # READERS_PER_HOST

    def subscribers(self, strategy: str, consumers: int, hosts: int = 1) -> int:
        if strategy == "race":
            return consumers
        return min(consumers, self.readers * hosts)

    def redis(self, strategy: str, consumers: int, hosts: int = 1) -> float:
        return self.redis_1 + self.redis_sub * (self.subscribers(strategy, consumers, hosts) - 1)

    def group(self, strategy: str, handler_us: float, consumers: int, hosts: int = 1) -> float:
        if strategy == "race":  # every consumer runs the handler on every message
            return consumers * (self.owned + handler_us)
        # Every reader but the owner, when a reader owns it (S of the N own alike).
        readers = self.subscribers(strategy, consumers, hosts)
        return self.owned + handler_us + (readers - readers / consumers) * self.buffered

    def reader(self, handler_us: float, consumers: int) -> float:
        """What one reader spends per message of the channel: it reads them all."""
        return (1 - 1 / consumers) * self.buffered + (self.owned + handler_us) / consumers


@dataclass(frozen=True)
class Rate:
    msg_s: float
    bound: str  # consumers, readers, redis or cpu


def rate(
    costs: Costs, strategy: str, handler_us: float, n: int, cores: int | None, hosts: int = 1
) -> Rate:
    """Written msg/s on a host of ``cores`` shared by all; None: a core for every process."""
    group, redis = costs.group(strategy, handler_us, n, hosts), costs.redis(strategy, n, hosts)
    bounds = {"consumers": min(n, cores or n) * 1e6 / group, "redis": 1e6 / redis}
    if strategy != "race":
        bounds["readers"] = 1e6 / costs.reader(handler_us, n)
    if cores is not None:
        bounds["cpu"] = cores * 1e6 / (redis + costs.publisher + group)
    bound = min(bounds, key=bounds.__getitem__)
    return Rate(bounds[bound], bound)


def hosts_for(consumers: int) -> int:
    return -(-consumers // CONSUMERS_PER_HOST)


@dataclass(frozen=True)
class Check:
    handler: str
    strategy: str
    consumers: int
    predicted: Rate
    measured: float
    error: float  # predicted / measured - 1
    lower_bound: bool  # the ramp ended before any step failed: the true maximum is higher

    def cells(self) -> tuple[str, ...]:
        predicted, measured = f"{self.predicted.msg_s:,.0f}", f"{self.measured:,.0f}"
        measured += " *" if self.lower_bound else ""
        return (
            self.handler,
            self.strategy,
            str(self.consumers),
            predicted,
            self.predicted.bound,
            measured,
            f"{self.error:+.0%}",
        )


@dataclass(frozen=True)
class Cap:
    handler: str
    redis_from: int | None  # the fewest consumers at which Redis is the bound
    best: Rate  # the highest rate over 1..MAX_CONSUMERS consumers
    best_at: int


@dataclass(frozen=True)
class Model:
    cores: int
    cost_rate: int  # msg/s of scenario 4, where the costs come from
    costs: dict[str, Costs]  # by strategy: only Redis's figures differ
    checks: list[Check]
    mean_abs_error: dict[str, float]  # by strategy, and "all"
    mean_error: dict[str, float]  # signed: the model's bias
    big_host: list[Cap]  # BIG_HOST_CORES cores shared by Redis, publisher and consumers
    many_hosts: list[Cap]  # a core per consumer on several hosts, one Redis on a core of its own
    hosts_table: dict[str, list[Rate]]  # the same, by handler, at HOST_CONSUMERS


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares r = r1 + r_sub (s - 1) over (subscribers, r); a negative slope is noise,
    read as 0."""
    if len({n for n, _ in points}) < 2:
        return statistics.fmean(r for _, r in points), 0.0
    slope, r1 = statistics.linear_regression([n - 1 for n, _ in points], [r for _, r in points])
    return r1, max(0.0, slope)


def measured(results: Results, handler: str, strategy: str, n: int) -> tuple[float, bool]:
    """Scenario 1's best lossless rate (trivial) or scenario 2's drain rate; 0 when missing."""
    if handler == CPU.name:
        drained = results.drain(CPU, strategy, n)
        return (drained.run.written_rate if drained else 0.0), False
    found = results.ramp(strategy, n)
    if found is None or found.best is None:
        return 0.0, False
    return found.best.written_rate, found.steps[-1].sustained


def scan(costs: Costs, handler: str, cores: int | None) -> Cap:
    """One host of ``cores``; None: hosts of CONSUMERS_PER_HOST consumers, a core each."""
    us = HANDLER_US[handler]
    rates = {
        n: rate(costs, "partitioned", us, n, cores, 1 if cores else hosts_for(n))
        for n in range(1, MAX_CONSUMERS + 1)
    }
    best_at = max(rates, key=lambda n: rates[n].msg_s)
    redis_from = next((n for n, r in rates.items() if r.bound == "redis"), None)
    return Cap(handler, redis_from, rates[best_at], best_at)


def build_model(results: Results) -> Model | None:
    """None when the run cannot split consumer CPU (one consumer count only)."""
    split = results.split
    if split is None:
        return None
    publisher, source = results.publisher_us_per_msg, "measured"
    if publisher is None:
        publisher, source = PUBLISHER_FACT_US, "an earlier measurement"
    costs = {}
    readers = DEFAULTS.readers_per_host
    for strategy in STRATEGIES:
        shape = Costs(0, 0, 0, 0, 0, "", readers)
        points = [
            (shape.subscribers(strategy, c.consumers), c.redis_us_per_msg)
            for c in results.costs
            if (c.strategy, c.path) == (strategy, DEDUP)
        ]
        r1, r_sub = line_fit(points)
        costs[strategy] = Costs(
            r1, r_sub, split.owned_us, split.buffered_us, publisher, source, readers
        )
    cores = int(results.meta.get("cpus") or 1)
    checks = []
    for handler, strategy, n in itertools.product(
        HANDLER_US, STRATEGIES, results.plan.consumer_counts
    ):
        got, lower = measured(results, handler, strategy, n)
        if got:
            predicted = rate(costs[strategy], strategy, HANDLER_US[handler], n, cores)
            checks.append(
                Check(handler, strategy, n, predicted, got, predicted.msg_s / got - 1, lower)
            )
    errors = {s: [c.error for c in checks if c.strategy == s] for s in STRATEGIES}
    errors["all"] = [c.error for c in checks]
    errors = {key: values for key, values in errors.items() if values}
    ours = costs["partitioned"]
    return Model(
        cores,
        results.plan.cost_rate,
        costs,
        checks,
        {key: statistics.fmean(map(abs, values)) for key, values in errors.items()},
        {key: statistics.fmean(values) for key, values in errors.items()},
        [scan(ours, handler, BIG_HOST_CORES) for handler in HANDLER_US],
        [scan(ours, handler, None) for handler in HANDLER_US],
        {
            h: [rate(ours, "partitioned", us, n, None, hosts_for(n)) for n in HOST_CONSUMERS]
            for h, us in HANDLER_US.items()
        },
    )


def md_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def cap_line(cap: Cap) -> str:
    capped = f"Redis caps from {cap.redis_from} consumers" if cap.redis_from else "Redis never caps"
    at = f"{cap.best_at} consumer{'s' if cap.best_at > 1 else ''}"
    best = f"{cap.best.msg_s:,.0f} msg/s at {at} ({cap.best.bound} bound)"
    return f"- {cap.handler}: {capped}; at most {best}"


def markdown(model: Model) -> str:
    """The model as the README's "Scaling out" shows it."""
    ours, race = model.costs["partitioned"], model.costs["race"]
    components = [
        ("redis-server, 1 subscriber (r1)", f"{ours.redis_1:.1f} (race {race.redis_1:.1f})"),
        (
            "redis-server, per extra subscriber (r_sub)",
            f"{ours.redis_sub:.2f} (race {race.redis_sub:.2f})",
        ),
        ("consumer, message owned (c_owned)", f"{ours.owned:.1f}"),
        ("reader, message only read, buffered, forwarded (c_buf)", f"{ours.buffered:.1f}"),
        ("publisher (p)", f"{ours.publisher:.1f} ({ours.publisher_source})"),
    ]
    hosts = [
        (str(n), *(f"{model.hosts_table[h][i].msg_s:,.0f}" for h in HANDLER_US))
        for i, n in enumerate(HOST_CONSUMERS)
    ]
    absolute = ", ".join(f"{key} {value:.0%}" for key, value in model.mean_abs_error.items())
    signed = ", ".join(f"{key} {value:+.0%}" for key, value in model.mean_error.items())
    shards = " and ".join(f"S x {cap.best.msg_s:,.0f} ({cap.handler})" for cap in model.many_hosts)
    lines = [
        f"CPU µs per written message, from scenario 4 at {model.cost_rate:,} msg/s:",
        "",
        *md_table(("component", "µs per message"), components),
        "",
        f"Model against this run ({model.cores} cores shared by Redis, publisher, consumers):",
        "",
        *md_table(CHECK_HEADER, [check.cells() for check in model.checks]),
        "",
        f"Mean absolute error: {absolute} (signed: {signed}).",
        "* the ramp ended before a step failed: the measured figure is a lower bound.",
        "",
        f"Prediction, one host of {BIG_HOST_CORES} cores shared by Redis, publisher, consumers:",
        *map(cap_line, model.big_host),
        "",
        f"Prediction, consumers on several hosts of {CONSUMERS_PER_HOST} (a core each, "
        f"{ours.readers} readers a host), one Redis (a core of its own):",
        "",
        *md_table(("consumers", *(f"{h} msg/s" for h in HANDLER_US)), hosts),
        "",
        *map(cap_line, model.many_hosts),
        f"- Every reader reads every message: even an unlimited Redis leaves a group under "
        f"1 / c_buf = {1e6 / ours.buffered:,.0f} msg/s; every host adds {ours.readers} "
        "subscribers, r_sub each, to Redis.",
        "- Past one Redis core: Redis Cluster partitions (sharded Pub/Sub, an output stream "
        f"per partition), about {shards} msg/s for S shards.",
    ]
    return "\n".join(lines)
