"""The fan-out bench's runs: two source trees, the daemon of each, one measured burst.

The baseline is a git ref checked out into a temporary worktree for the length of the bench, so
no old code stays in the repository; both trees' daemons run with the same Python.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TextIO

import redis

from demo.benchmark.daemon import wait_for_group, wait_for_heartbeats
from demo.benchmark.measure import BenchError, flush, read_output, redis_cpu_us, wait_for_output
from demo.benchmark.plan import ROOT, STOP_TIMEOUT_S
from demo.benchmark.publishing import Published, PublishJob
from processor.config import DAEMON_OPTIONS, Settings
from processor.consumer.ownership import handover_grace_s

CLOCK_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
GIT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Tree:
    """A source tree whose daemon is measured: this checkout, or the baseline's worktree."""

    name: str  # "baseline" or "current"
    root: Path
    ref: str
    commit: str


@dataclass(frozen=True)
class Sample:
    """One burst drained by one tree's daemon with ``consumers`` consumers."""

    tree: str
    consumers: int
    round: int
    published: int
    unreceived: int  # PUBLISH replied 0: nobody was subscribed
    written: int  # unique message ids in the output stream
    duplicates: int  # stream entries beyond one per id
    drain_rate: float  # written / (last write - first publish)
    redis_us: float  # redis-server CPU per written message
    daemon_us: float  # the supervisor and all its descendants, CPU per written message
    others_cores: float  # the machine's CPU spent outside the bench meanwhile, in cores

    @property
    def problems(self) -> str:
        lost = self.published - self.written
        counts = (("lost", lost), ("duplicated", self.duplicates))
        return ", ".join(f"{label} {count:,}" for label, count in counts if count)


# -- the trees ---------------------------------------------------------------------------------


def git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
    )
    if result.returncode:
        raise BenchError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def current_tree() -> Tree:
    commit = git("rev-parse", "HEAD")
    # What runs is the working tree, which may hold changes not yet committed.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return Tree("current", ROOT, "working tree" if dirty else "HEAD", commit)


def resolve(ref: str) -> str:
    """The commit ``ref`` names; BenchError when it names none."""
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except BenchError:
        raise BenchError(f"{ref!r} names no commit of this repository") from None


@contextlib.contextmanager
def baseline_tree(ref: str, commit: str) -> Iterator[Tree]:
    """``commit`` checked out (detached) in a temporary worktree, removed whatever happens."""
    directory = Path(tempfile.mkdtemp(prefix="fanout-baseline-"))
    try:
        git("worktree", "add", "--detach", str(directory), commit)
        if not (directory / "demo" / "consume.py").is_file():
            raise BenchError(f"{ref} ({commit[:12]}) has no demo/consume.py to run")
        yield Tree("baseline", directory, ref, commit)
    finally:
        remove_worktree(directory)


def remove_worktree(directory: Path) -> None:
    # Each step on its own: a worktree half added (git failed or was interrupted) must go too.
    with contextlib.suppress(BenchError):
        git("worktree", "remove", "--force", str(directory))
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(BenchError):
        git("worktree", "prune")


# -- the daemon's CPU: the supervisor and every descendant ---------------------------------------


def proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks of the process and of its children it has waited for)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        # The command name may hold spaces and parentheses: fields start after the last ")".
        fields = text.rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        stats[int(entry.name)] = (int(fields[1]), utime + stime + cutime + cstime)
    return stats


def tree_cpu_us(root_pid: int) -> float:
    """CPU time of ``root_pid`` and all its descendants, living or exited.

    A descendant that exited is counted through its parent's cutime/cstime once reaped, or its
    own figures while a zombie, so sampling only before and after the burst misses nothing:
    the supervisor waits for the consumers it replaces.
    """
    stats = proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, pending = 0, [root_pid]
    while pending:
        pid = pending.pop()
        if pid in stats:
            total += stats[pid][1]
            pending.extend(children.get(pid, []))
    return total * CLOCK_TICK_US


# -- the daemon ----------------------------------------------------------------------------------


def daemon_env(tree: Tree, url: str, consumers: int) -> dict[str, str]:
    """The daemon's defaults but for these settings, whatever the caller's environment says."""
    settings = {option.env for option in DAEMON_OPTIONS}
    env = {name: value for name, value in os.environ.items() if name not in settings}
    return env | {
        "REDIS_URL": url,
        "CONSUMERS_COUNT": str(consumers),
        "STRATEGY": "partitioned",
        "MONITORING_INTERVAL": "3600",
        "LOGLEVEL": "WARNING",
        "PYTHONPATH": str(tree.root),  # spawned consumers import the package from their tree
        "PYTHONUNBUFFERED": "1",
    }


@contextlib.contextmanager
def daemon(client: redis.Redis, url: str, tree: Tree, consumers: int, log: TextIO) -> Iterator[int]:
    """Runs the tree's demo/consume.py on a flushed Redis; yields its pid once all own a share."""
    flush(client)
    log.write(f"--- {tree.name} ({tree.commit[:12]}) x{consumers}\n")
    log.flush()
    proc = subprocess.Popen(
        [sys.executable, str(tree.root / "demo" / "consume.py")],
        env=daemon_env(tree, url, consumers),
        cwd=tree.root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ids = wait_for_group(client, consumers, proc)
        wait_for_heartbeats(client, ids)
        # A consumer that handed lanes to a newcomer keeps them for a grace period that began
        # at the latest with the beat just seen: a burst sent earlier measures the join.
        time.sleep(handover_grace_s(Settings().heartbeat_interval_ms))
        yield proc.pid
    finally:
        stop(proc, log)


def stop(proc: subprocess.Popen[bytes], log: TextIO) -> None:
    """SIGTERM, as an operator stops it; the session is killed if it outstays STOP_TIMEOUT_S."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.write(f"--- the daemon ignored SIGTERM for {STOP_TIMEOUT_S:g} s: killed\n")
    # Whatever is left of its session (nothing, after a clean stop) must not outlive the run.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- one measured burst --------------------------------------------------------------------------


@dataclass(frozen=True)
class Burst:
    published: Published
    redis_us: float
    daemon_us: float
    others_cores: float


def machine_busy_us() -> float:
    """CPU time all cores have spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) * CLOCK_TICK_US


def measure_burst(
    client: redis.Redis, publisher: Connection, daemon_pid: int, job: PublishJob
) -> Burst:
    """Publishes the burst and waits for the output; the CPU each side spent meanwhile.

    ``others_cores``: what the machine spent outside the bench's own processes (Redis, the
    daemon and the publisher are all its descendants), in cores: the run's noise.
    """
    started = time.monotonic()
    machine_before, bench_before = machine_busy_us(), tree_cpu_us(os.getpid())
    redis_before, daemon_before = redis_cpu_us(client), tree_cpu_us(daemon_pid)
    publisher.send(job)
    published: Published = publisher.recv()
    wait_for_output(client, published.count - published.unreceived)
    # Sampled before the bench's own XRANGE over the output adds to Redis's figure.
    daemon_us = tree_cpu_us(daemon_pid) - daemon_before
    redis_us = redis_cpu_us(client) - redis_before
    bench_us = tree_cpu_us(os.getpid()) - bench_before
    others_us = machine_busy_us() - machine_before - bench_us
    return Burst(published, redis_us, daemon_us, others_us / 1e6 / (time.monotonic() - started))


def run_once(
    url: str,
    publisher: Connection,
    tree: Tree,
    consumers: int,
    messages: int,
    round_number: int,
    log: TextIO,
) -> Sample:
    client = redis.Redis.from_url(url)
    job = PublishJob(messages, 0, f"{tree.name[0]}{consumers}r{round_number}")
    try:
        with daemon(client, url, tree, consumers, log) as pid:
            burst = measure_burst(client, publisher, pid, job)
            output = read_output(client)
    finally:
        client.close()
    published = burst.published
    window_s = (output.last_ms - published.first_ms) / 1000
    per_message = max(output.unique, 1)
    return Sample(
        tree=tree.name,
        consumers=consumers,
        round=round_number,
        published=published.count,
        unreceived=published.unreceived,
        written=output.unique,
        duplicates=output.entries - output.unique,
        drain_rate=output.unique / window_s if window_s > 0 else 0.0,
        redis_us=burst.redis_us / per_message,
        daemon_us=burst.daemon_us / per_message,
        others_cores=burst.others_cores,
    )
