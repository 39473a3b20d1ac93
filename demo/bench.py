"""The benchmark: ``python demo/bench.py [--quick] [--publish-chart]``, or ``make bench``.

Starts a private redis-server, then runs every scenario with both strategies: each run starts
``demo/consume.py`` on a flushed Redis, waits for the whole group to be live, publishes from a
separate process (pipelines of PUBLISH, messages built in advance) and measures what reaches
the output stream. Prints one table with the targets (docs/), writes
``bench-results/bench.json`` and ``bench-results/throughput.png``.

Scenarios:
  0  baseline: one plain redis-py subscriber (PubSub.listen, XADD pipelined per 100, no locks)
  1  trivial handler: the offered rate is stepped up until a step loses or duplicates messages
     or lags (last write more than LAG_S after the last publish); reports the best step
  2  cpu_100us handler: drain rate of a burst
  3  io_2ms and async_io_2ms handlers: drain rate; async_io_2ms at HANDLER_CONCURRENCY 16 too
  4  cost per written message at a moderate rate: Redis commands, Redis CPU, consumer CPU
  5  publish-to-stream latency at half the best rate of scenario 1 (the baseline write paths
     at the same rate and consumer count)
  6  Redis memory per message kept for deduplication (measured in the runs of scenario 4)
  7  overload: cpu_100us handler, a long burst offered at twice what one consumer drains,
     1 and 2 consumers, partitioned

Scenarios 1, 4, 5 and 6 also run, partitioned, with the two write paths today's replaced, inside
the same daemon (demo/benchmark/write_paths.py): the previous script (a lock key per id) and the
seed's two pipelines. The ratios against them are in the targets table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.benchmark.measure import BenchError
from demo.benchmark.plan import DOCS_CHART, FULL, QUICK, RESULTS_DIR, ROOT
from demo.benchmark.report import print_report, save
from demo.benchmark.scenarios import measure_everything
from demo.redis_server import RedisServerFailed, RedisServerNotFound

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MISSING_MATPLOTLIB = (
    "matplotlib is missing: pip install -r bench-requirements.txt (make bench does)"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rates and consumer counts, shorter runs (a minute or so)",
    )
    parser.add_argument(
        "--publish-chart",
        action="store_true",
        help=f"also copy the chart to {DOCS_CHART.relative_to(ROOT)} for the README",
    )
    args = parser.parse_args()
    if importlib.util.find_spec("matplotlib") is None:
        print(f"bench.py: error: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return EXIT_USAGE
    RESULTS_DIR.mkdir(exist_ok=True)
    try:
        results = measure_everything(QUICK if args.quick else FULL, args.quick)
    except (BenchError, RedisServerNotFound, RedisServerFailed) as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_report(results)
    save(results, args.publish_chart)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
