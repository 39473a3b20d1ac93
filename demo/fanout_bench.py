"""The fan-out bench: ``python demo/fanout_bench.py [--baseline REF] [--quick]``.

What more consumers cost: this tree, where only readers subscribe, against a baseline from
before readers, where every consumer read every message. For each consumer count and
each of two source trees (this one, and ``--baseline``, a git ref checked out into a temporary
worktree for the length of the bench), ``--rounds`` times, counts and trees interleaved (see
``schedule``): flush a private redis-server, start the tree's ``demo/consume.py`` (trivial
handler, partitioned), wait until every consumer owns its share, publish a burst of
``--messages`` ~150-byte JSON messages as fast as a separate publisher process goes (pipelined
PUBLISH, built in advance), and measure

- the drain rate: messages written / (last write - first publish);
- Redis CPU per message: ``INFO cpu`` (user + sys) across the burst / messages written;
- the daemon's CPU per message: utime + stime of the supervisor and all its descendants from
  ``/proc/<pid>/stat``, with the children they have reaped (cutime + cstime), across the burst;
- the noise: cores the machine kept busy outside the bench's own processes meanwhile;

then check that every message was written exactly once and stop the daemon with SIGTERM. Prints
the medians with the ratios the targets name; writes ``bench-results/fanout.json`` and, with
matplotlib installed, ``bench-results/fanout.png``. ``make bench-fanout ARGS=...`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.benchmark.fanout import Sample, Tree, baseline_tree, current_tree, resolve, run_once
from demo.benchmark.fanout_report import (
    TARGETS,
    TREES,
    Median,
    draw_chart,
    medians,
    report_lines,
    target_ratio,
)
from demo.benchmark.measure import BenchError
from demo.benchmark.plan import RESULTS_DIR
from demo.benchmark.publishing import publisher_process
from demo.redis_server import (
    RedisServer,
    RedisServerFailed,
    RedisServerNotFound,
    exit_cleanly_on_sigterm,
)

# The commit the current tree is compared with when --baseline is not given: the last one before
# readers (every consumer subscribed and read every message).
BASELINE_REF = "f8b058feb125a9d14b1bb87d23d1908e342bc5a4"
COUNTS = (1, 2, 4, 8, 10, 16)
QUICK_COUNTS = (1, 2, 10)
MESSAGES = 200_000
QUICK_MESSAGES = 50_000
ROUNDS = 3
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
NO_MATPLOTLIB = "matplotlib is missing, no chart: pip install -r bench-requirements.txt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE_REF, help="the git ref to compare with")
    parser.add_argument("--consumers", type=counts_arg, help="e.g. 1,2,4,8,10,16 (the default)")
    parser.add_argument("--messages", type=positive, help=f"per burst (default {MESSAGES:,})")
    parser.add_argument("--rounds", type=positive, help=f"per count and tree (default {ROUNDS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_MESSAGES:,} messages, consumers {','.join(map(str, QUICK_COUNTS))}, 1 round",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS_DIR, help="where to write fanout.json and the chart"
    )
    args = parser.parse_args(argv)
    try:
        args.baseline_commit = resolve(args.baseline)
    except BenchError as error:
        parser.error(f"--baseline: {error}")
    args.consumers = args.consumers or (QUICK_COUNTS if args.quick else COUNTS)
    args.messages = args.messages or (QUICK_MESSAGES if args.quick else MESSAGES)
    args.rounds = args.rounds or (1 if args.quick else ROUNDS)
    return args


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def counts_arg(text: str) -> tuple[int, ...]:
    return tuple(sorted({positive(part) for part in text.split(",")}))


def schedule(counts: tuple[int, ...], rounds: int) -> Iterator[tuple[int, int, str]]:
    """(consumers, round, tree) in order. Each round runs every count, ascending in odd rounds
    and descending in even ones, and the first tree changes every round (ABBA): a drift of the
    machine's load over the bench weighs on every count and both trees alike (with the counts
    one after the other, a slow minute landed on one count and skewed its ratios)."""
    for round_number in range(1, rounds + 1):
        odd = round_number % 2 == 1
        trees = TREES if odd else TREES[::-1]
        for consumers in counts if odd else counts[::-1]:
            for tree in trees:
                yield consumers, round_number, tree


def measure_all(
    args: argparse.Namespace, trees: dict[str, Tree], url: str, publisher: Connection, log: TextIO
) -> list[Sample]:
    samples = []
    started = time.monotonic()
    for consumers, round_number, name in schedule(args.consumers, args.rounds):
        sample = run_once(url, publisher, trees[name], consumers, args.messages, round_number, log)
        samples.append(sample)
        print(
            f"[{time.monotonic() - started:4.0f} s] {name:<8} x{consumers:<2} round {round_number}:"
            f" {sample.drain_rate:>9,.0f} msg/s  Redis {sample.redis_us:5.2f} µs/msg"
            f"  daemon {sample.daemon_us:5.2f} µs/msg  others {sample.others_cores:4.2f} cores"
            f"  {sample.problems or 'all written once'}",
            flush=True,
        )
    return samples


def describe(trees: dict[str, Tree]) -> str:
    return ", ".join(f"{t.name} {t.ref} ({t.commit[:12]})" for t in trees.values())


def save(
    args: argparse.Namespace,
    trees: dict[str, Tree],
    samples: list[Sample],
    table: dict[tuple[str, int], Median],
    meta: dict[str, Any],
) -> None:
    results = {
        "meta": meta,
        "trees": {
            name: dataclasses.asdict(tree) | {"root": str(tree.root)}
            for name, tree in trees.items()
        },
        "samples": [dataclasses.asdict(sample) for sample in samples],
        "medians": [dataclasses.asdict(median) for median in table.values()],
        "targets": [
            {"target": target.label} | {tree: target_ratio(table, tree, target) for tree in TREES}
            for target in TARGETS
        ],
    }
    (args.results / "fanout.json").write_text(json.dumps(results, indent=2) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        print(f"fanout_bench.py: {NO_MATPLOTLIB}", file=sys.stderr)
        return
    title = f"fan-out: {describe(trees)}; {args.messages:,} messages, {meta['cpus']} CPUs"
    draw_chart(table, title, args.results / "fanout.png")


def bench(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "messages": args.messages,
        "rounds": args.rounds,
        "consumers": list(args.consumers),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
    }
    with (
        baseline_tree(args.baseline, args.baseline_commit) as baseline,
        RedisServer() as server,
        publisher_process(server.url) as publisher,
        open(args.results / "fanout-daemon.log", "w") as log,
    ):
        trees = {"baseline": baseline, "current": current_tree()}
        print(
            f"fan-out bench: {describe(trees)}; {args.messages:,} messages a burst;"
            f" the baseline checked out in {baseline.root}",
            flush=True,
        )
        samples = measure_all(args, trees, server.url, publisher, log)
    table = medians(samples)
    # Not the load average after: the bench's own consumers make most of it.
    print(
        f"\nmedians of {args.rounds} round(s); load average before the bench"
        f" {meta['load_before'][0]:.2f}; others: cores busy outside the bench"
    )
    print("\n".join(report_lines(table, args.consumers)))
    save(args, trees, samples, table, meta)
    return EXIT_FAILED if any(median.problems for median in table.values()) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_sigterm()  # so the baseline's worktree and Redis go on SIGTERM as well
    try:
        return bench(args)
    except (BenchError, RedisServerNotFound, RedisServerFailed) as error:
        print(f"fanout_bench.py: error: {error}", file=sys.stderr)
        print(f"the daemons' output: {args.results / 'fanout-daemon.log'}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fanout_bench.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
