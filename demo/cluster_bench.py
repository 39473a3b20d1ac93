"""The cluster bench: ``python demo/cluster_bench.py`` (or ``make bench-cluster``).

Runs the same workload (the daemon with two consumers, the default handler, the publisher at a
steady rate) on one private redis-server with a replica and then on a local Redis Cluster of
three primaries with a replica each (PARTITIONS=3), without and with WAIT_REPLICAS=1, and
measures each node's CPU (``INFO cpu``) per message written, above what it spends idle, and the
commands it spent it in. Every node shares this machine's cores, so the cluster
cannot show its gain in msg/s here: the figures feed the model instead. One Redis saturates at
one core, so it carries about 1e6 / c msg/s for c µs of its CPU per message; a cluster carries
about 1e6 / c_max, c_max being the busiest primary's µs per message of the whole stream, which
for S evenly loaded shards is S x 1e6 / (the primaries' sum).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from demo.benchmark.measure import poll, redis_cpu_us
from demo.redis_cluster import ClusterUnavailable, LocalCluster
from demo.redis_server import RedisServer
from processor.config import DAEMON_OPTIONS, Settings
from processor.consumer.ownership import handover_grace_s
from processor.observe.counters import read_counters
from processor.store.connection import command_client
from processor.store.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 3
CONSUMERS = 2
START_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0


@dataclass
class Run:
    name: str
    written: int
    elapsed_s: float
    # Per node: (role, µs of Redis CPU per message written, above what it spends idle).
    nodes: list[tuple[str, float]]
    # Per node: µs of CPU per second with the daemon running and nothing published.
    idle: list[float]
    # Per node: the commands Redis spent most time in (INFO commandstats), µs per message.
    top: list[list[tuple[str, float]]]

    def primaries_us(self) -> list[float]:
        return [cost for role, cost in self.nodes if role == "primary"]


def settings_for(url: str, cluster: bool, wait_replicas: int = 0) -> dict[str, str]:
    env = {
        "REDIS_URL": url,
        "CONSUMERS_COUNT": str(CONSUMERS),
        "MONITORING_INTERVAL": "3600",
        "LOGLEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "WAIT_REPLICAS": str(wait_replicas),
    }
    if cluster:
        env |= {"REDIS_CLUSTER": "true", "PARTITIONS": str(PARTITIONS)}
    return env


def clean_environment() -> dict[str, str]:
    """The caller's environment without the daemon's settings: each run sets its own."""
    settings = {option.env for option in DAEMON_OPTIONS}
    return {name: value for name, value in os.environ.items() if name not in settings}


@contextmanager
def daemon(env: dict[str, str], log: Path) -> Iterator[None]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "demo" / "consume.py")],
            env={**clean_environment(), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def measure(
    name: str, env: dict[str, str], nodes: list[tuple[str, str]], rate: int, seconds: float
) -> Run:
    settings = Settings(
        redis_url=env["REDIS_URL"],
        redis_cluster=env.get("REDIS_CLUSTER") == "true",
        partitions=int(env.get("PARTITIONS", "1")),
    )
    keys = Keys.from_settings(settings)
    client = command_client(settings, name="cluster-bench")
    node_clients = [(role, redis.Redis.from_url(url)) for role, url in nodes]
    log = ROOT / "bench-results" / "cluster-bench.log"
    log.parent.mkdir(exist_ok=True)
    try:
        with daemon(env, log):
            poll(lambda: client.llen(keys.consumers) == CONSUMERS, "the consumers", START_TIMEOUT_S)
            time.sleep(
                handover_grace_s(Settings().heartbeat_interval_ms)
            )  # past the newcomers' hand-over grace
            # What each node spends with nothing published (heartbeats, cron, cluster bus): it
            # is taken off the run's figures, so they are the cost of the messages.
            idle_start = [redis_cpu_us(node) for _, node in node_clients]
            time.sleep(seconds)
            before = [redis_cpu_us(node) for _, node in node_clients]
            for _, node in node_clients:
                node.config_resetstat()
            idle = [(end - start) / seconds for start, end in zip(idle_start, before, strict=True)]
            written_before = read_counters(client, keys)["written"]
            started = time.monotonic()
            publisher = [
                sys.executable, str(ROOT / "demo" / "publish.py"), "--rate", str(rate),
                "--target-duration-s", str(seconds), "--batch-size", "100",
            ]  # fmt: skip
            subprocess.run(
                publisher, env={**clean_environment(), **env}, check=True, capture_output=True
            )
            expected = written_before + int(rate * seconds)
            poll(
                lambda: read_counters(client, keys)["written"] >= expected * 0.999,
                "the writes",
                SETTLE_TIMEOUT_S,
            )
            elapsed = time.monotonic() - started
            written = read_counters(client, keys)["written"] - written_before
            after = [redis_cpu_us(node) for _, node in node_clients]
            top = [top_commands(node, max(written, 1)) for _, node in node_clients]
    finally:
        client.close()
        for _, node in node_clients:
            node.close()
    costs = [
        (role, (end - start - idle_us * elapsed) / max(written, 1))
        for (role, _), start, end, idle_us in zip(node_clients, before, after, idle, strict=True)
    ]
    return Run(name, written, elapsed, costs, idle, top)


def top_commands(client: redis.Redis, written: int) -> list[tuple[str, float]]:
    stats = client.info("commandstats")
    spent = [
        (name.removeprefix("cmdstat_"), int(stat["usec"]) / written) for name, stat in stats.items()
    ]
    return sorted(spent, key=lambda item: -item[1])[:4]


def replica_of(server: RedisServer) -> dict[str, str]:
    return {"replicaof": f"127.0.0.1 {server.port}"}


def replica_in_sync(replica: RedisServer) -> bool:
    with redis.Redis.from_url(replica.url) as client:
        return bool(client.info("replication").get("master_link_status") == "up")


def roles(cluster: LocalCluster) -> list[tuple[str, str]]:
    found = []
    for node in cluster.nodes:
        with redis.Redis.from_url(node.url) as client:
            role = client.execute_command("ROLE")[0]
        found.append(("primary" if role == b"master" else "replica", node.url))
    return found


def report(runs: list[Run], repeat: int) -> None:
    single = runs[0]
    base = single.primaries_us()[0]
    print(f"\nmedians of {repeat} interleaved runs of each setup")
    print(f"{'run':<30} {'written':>8}  Redis CPU per message written above idle, µs")
    for run in runs:
        primaries = run.primaries_us()
        replicas = [cost for role, cost in run.nodes if role == "replica"]
        line = " + ".join(f"{cost:.1f}" for cost in primaries)
        extra = f"  (replicas {' + '.join(f'{cost:.1f}' for cost in replicas)})" if replicas else ""
        total = f" = {sum(primaries):.1f}" if len(primaries) > 1 else ""
        idle = ", ".join(f"{cost / 1e4:.1f}" for cost in run.idle)
        print(f"{run.name:<30} {run.written:>8,}  primaries {line}{total}{extra}")
        print(f"{'':<30} {'':>8}  idle, % of a core per node: {idle}")
        for (role, _), top in zip(run.nodes, run.top, strict=True):
            spent = ", ".join(f"{command} {cost:.2f}" for command, cost in top)
            print(f"{'':<30} {'':>8}    {role}: {spent}")
    print("\nmodel: msg/s one core per primary carries (1e6 / busiest primary's µs per message)")
    print(f"  one Redis:                         {1e6 / base:>10,.0f} msg/s")
    for run in runs[1:]:
        primaries = run.primaries_us()
        carried = 1e6 / max(primaries)
        even = len(primaries) * 1e6 / sum(primaries)
        print(
            f"  {run.name:<34}{carried:>10,.0f} msg/s as measured, {even:,.0f} if even "
            f"({carried / (1e6 / base):.2f}x one Redis); sum of primaries "
            f"{sum(primaries) / base:.2f}x one Redis's cost"
        )


@dataclass(frozen=True)
class Setup:
    name: str
    env: dict[str, str]
    nodes: list[tuple[str, str]]


def median_run(runs: list[Run]) -> Run:
    """Each node's median cost over the repeats; the commands of the run with the median total."""
    middle = sorted(runs, key=lambda run: sum(run.primaries_us()))[len(runs) // 2]
    nodes = [
        (role, statistics.median(run.nodes[index][1] for run in runs))
        for index, (role, _) in enumerate(runs[0].nodes)
    ]
    idle = [
        statistics.median(run.idle[index] for run in runs) for index in range(len(runs[0].idle))
    ]
    return Run(middle.name, middle.written, middle.elapsed_s, nodes, idle, middle.top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000, help="msg/s offered")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of publishing")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setup, interleaved")
    args = parser.parse_args()
    # One Redis with a replica, like each shard of the cluster: replication is part of the cost.
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(RedisServer())
        replica = stack.enter_context(RedisServer(extra_config=replica_of(server)))
        poll(lambda: replica_in_sync(replica), "the replica", START_TIMEOUT_S)
        setups = [
            Setup(
                "one Redis",
                settings_for(server.url, cluster=False),
                [("primary", server.url), ("replica", replica.url)],
            )
        ]
        try:
            cluster = stack.enter_context(LocalCluster())
        except ClusterUnavailable as error:
            print(f"cluster runs skipped: {error}")
        else:
            nodes = roles(cluster)
            name = f"cluster, {PARTITIONS} partitions"
            setups += [
                Setup(name, settings_for(cluster.url, cluster=True), nodes),
                Setup(
                    f"{name}, WAIT 1",
                    settings_for(cluster.url, cluster=True, wait_replicas=1),
                    nodes,
                ),
                Setup(
                    f"{name}, batches of 100",
                    settings_for(cluster.url, cluster=True)
                    | {"PROCESSING_BATCH_SIZE": str(100 // PARTITIONS)},
                    nodes,
                ),
            ]
        results: dict[str, list[Run]] = {setup.name: [] for setup in setups}
        for _ in range(args.repeat):
            for setup in setups:
                run = measure(setup.name, setup.env, setup.nodes, args.rate, args.seconds)
                results[setup.name].append(run)
    report([median_run(runs) for runs in results.values()], args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
