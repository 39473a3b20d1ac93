"""What the bench runs and where: shared paths and limits, the handler cases and the plans."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from processor.config import Settings
from processor.store.keys import Keys

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULTS = Settings()
KEYS = Keys.from_settings(DEFAULTS)
RESULTS_DIR = ROOT / "bench-results"
DOCS_CHART = ROOT / "docs" / "throughput.png"
STRATEGIES = ("partitioned", "race")
STOP_TIMEOUT_S = 30.0
# The daemon's write path and the two it is measured against (demo/benchmark/write_paths.py).
DEDUP, LOCKS, PIPELINES = "dedup", "locks", "pipelines"
BASELINE_PATHS = (LOCKS, PIPELINES)
# Where both baselines keep their lock key per id (the daemon keeps none).
LOCK_PREFIX = f"{DEFAULTS.key_prefix}:lock:"
WRITE_PATH_ENV = "BENCH_WRITE_PATH"
PATH_LABELS = {
    DEDUP: "today's write",
    LOCKS: "previous write: lock key per id",
    PIPELINES: "seed write: two pipelines",
}


@dataclass(frozen=True)
class HandlerCase:
    """A handler as the bench runs it, with a rough capacity of one consumer to size bursts."""

    name: str
    spec: str  # the HANDLER setting; "" for the daemon's default
    concurrency: int = 1
    capacity: float = 0.0  # msg/s one consumer drains, roughly
    cpu_bound: bool = False


TRIVIAL = HandlerCase("trivial", "")
CPU = HandlerCase("cpu_100us", "demo.bench_handlers:cpu_100us", capacity=8_000, cpu_bound=True)
IO = HandlerCase("io_2ms", "demo.bench_handlers:io_2ms", capacity=450)
ASYNC_IO = HandlerCase("async_io_2ms", "demo.bench_handlers:async_io_2ms", capacity=450)
ASYNC_IO_16 = HandlerCase(
    "async_io_2ms", "demo.bench_handlers:async_io_2ms", concurrency=16, capacity=6_000
)


@dataclass(frozen=True)
class Plan:
    """How much of each scenario to run."""

    consumer_counts: tuple[int, ...]
    ramp_rates: tuple[int, ...]  # msg/s offered in scenario 1, in order
    step_s: float  # publishing time of one ramp step
    sweep: tuple[HandlerCase, ...]  # drained at every consumer count (ASYNC_IO_16 at 1 always)
    work_s: float  # a drain burst holds about this much work at the expected drain rate
    cost_rate: int
    cost_s: float
    latency_s: float
    overload_messages: int  # the cpu_100us handler offered ...
    overload_rate: int  # ... at about twice what one consumer drains


FULL = Plan(
    consumer_counts=(1, 2, 4, 8),
    ramp_rates=(
        *(25_000, 40_000, 50_000, 60_000, 70_000, 80_000, 90_000, 100_000),
        *(125_000, 150_000, 175_000, 200_000, 250_000),
    ),
    step_s=3,
    sweep=(CPU, IO, ASYNC_IO),
    work_s=3,
    cost_rate=20_000,
    cost_s=5,
    latency_s=5,
    overload_messages=40_000,
    overload_rate=20_000,
)
QUICK = Plan(
    consumer_counts=(1, 2, 4),
    ramp_rates=(25_000, 50_000, 75_000),
    step_s=1,
    sweep=(CPU, IO),
    work_s=1,
    cost_rate=20_000,
    cost_s=1.5,
    latency_s=1.5,
    overload_messages=20_000,
    overload_rate=20_000,
)
