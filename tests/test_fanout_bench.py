"""The fan-out bench: its figures and targets from given runs, and one tiny run of both trees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.benchmark.fanout import Sample, machine_busy_us, tree_cpu_us
from demo.benchmark.fanout_report import TARGETS, draw_chart, medians, report_lines, target_ratio
from demo.fanout_bench import schedule
from tests.conftest import REPO_ROOT
from tests.helpers import wait_until

# Burns this much CPU in a child process, then exits.
BURN_S = 0.3
BURN = (
    "import time\n"
    f"end = time.process_time() + {BURN_S}\n"
    "while time.process_time() < end:\n"
    "    pass\n"
)


def sample(tree: str, consumers: int, drain: float, redis_us: float, daemon_us: float, **kw):
    fields = {"round": 1, "published": 1000, "unreceived": 0, "written": 1000, "duplicates": 0}
    fields["others_cores"] = 0.0
    return Sample(
        tree, consumers, drain_rate=drain, redis_us=redis_us, daemon_us=daemon_us, **(fields | kw)
    )


def test_each_target_is_a_ratio_between_consumer_counts_of_one_tree() -> None:
    # The baseline as measured before on this machine; the current tree as the targets want it.
    table = medians(
        [
            sample("baseline", 2, 100_900, 6.3, 11.2),
            sample("baseline", 10, 58_200, 9.2, 24.5),
            sample("baseline", 16, 40_000, 11.0, 35.0),
            sample("current", 2, 100_000, 6.0, 11.0),
            sample("current", 10, 105_000, 6.3, 12.0),
            sample("current", 16, 106_000, 6.3, 12.0),
        ]
    )
    ratios = {
        t.label: (target_ratio(table, "baseline", t), target_ratio(table, "current", t))
        for t in TARGETS
    }
    assert round(ratios["drain rate, 10 vs 2, >= 1.0x"][0], 2) == 0.58
    assert round(ratios["Redis CPU per message, 10 vs 2, <= 1.1x"][0], 2) == 1.46
    assert round(ratios["daemon CPU per message, 16 vs 10, <= 1.0x"][1], 2) == 1.0

    lines = report_lines(table, [2, 10, 16])
    rows = {line.split()[0] + " " + line.split()[1]: line for line in lines[1:7]}
    assert "0.99x / 0.95x / 0.98x" in rows["2 current"]  # current vs baseline at each count
    verdicts = {line.split(",")[0] + line.split(",")[1]: line.split()[-4:] for line in lines[9:]}
    assert verdicts["drain rate 10 vs 2"] == ["0.58x", "MISSED", "1.05x", "met"]
    assert verdicts["Redis CPU per message 10 vs 2"] == ["1.46x", "MISSED", "1.05x", "met"]
    assert verdicts["daemon CPU per message 10 vs 2"] == ["2.19x", "MISSED", "1.09x", "met"]
    assert verdicts["drain rate 16 vs 10"] == ["0.69x", "MISSED", "1.01x", "met"]


def test_a_target_whose_counts_were_not_run_says_so() -> None:
    table = medians([sample("current", 2, 100_000, 6.0, 11.0)])
    lines = report_lines(table, [2])
    assert lines[1].split()[:2] == ["2", "current"]
    assert all(line.endswith("n/a not measured") for line in lines[4:])


def test_medians_take_the_middle_round_and_keep_every_problem() -> None:
    (median,) = medians(
        [
            sample("current", 4, 90_000, 7.0, 20.0, round=1),
            sample("current", 4, 70_000, 9.0, 10.0, round=2, written=990, duplicates=3),
            sample("current", 4, 80_000, 8.0, 30.0, round=3),
        ]
    ).values()
    assert (median.drain_rate, median.redis_us, median.daemon_us) == (80_000, 8.0, 20.0)
    assert median.problems == "round 2: lost 10, duplicated 3"


def test_each_round_runs_every_count_and_counts_and_trees_alternate() -> None:
    order = list(schedule((1, 2), 2))
    assert order == [
        (1, 1, "baseline"), (1, 1, "current"), (2, 1, "baseline"), (2, 1, "current"),
        (2, 2, "current"), (2, 2, "baseline"), (1, 2, "current"), (1, 2, "baseline"),
    ]  # fmt: skip


def test_a_process_tree_cpu_counts_exited_children_and_living_grandchildren() -> None:
    """A child that exited (reaped) counts through its parent; a grandchild while it runs."""
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         f"subprocess.run([sys.executable, '-c', {BURN!r}])\n"  # exits, reaped
         f"child = subprocess.Popen([sys.executable, '-c', {BURN!r} + 'time.sleep(60)'])\n"
         "sys.stdin.read()\n"
         "child.kill()\n"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    machine_before = machine_busy_us()
    try:
        deadline = time.monotonic() + 60
        # /proc counts whole clock ticks, each process's figure rounded down.
        while (tree_us := tree_cpu_us(parent.pid)) < (2 * BURN_S - 0.05) * 1e6:
            assert time.monotonic() < deadline, f"tree CPU stuck at {tree_us} µs"
            time.sleep(0.05)
        # The whole machine's busy time holds the tree's, which is how the bench tells the
        # CPU spent outside it.
        assert machine_busy_us() - machine_before >= tree_us - 0.05e6
    finally:
        parent.communicate(b"", timeout=30)


def worktrees() -> set[str]:
    listing = subprocess.run(
        ["git", "worktree", "list", "--porcelain"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line.split(" ", 1)[1] for line in listing.splitlines() if line.startswith("worktree ")}


def test_the_bench_measures_both_trees_and_removes_the_baseline_worktree(tmp_path) -> None:
    tiny = ["--quick", "--consumers", "1", "--messages", "2000", "--rounds", "1"]
    result = subprocess.run(
        [sys.executable, "demo/fanout_bench.py", *tiny, "--baseline", "HEAD",
         "--results", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count("all written once") == 2, result.stdout
    results = json.loads((tmp_path / "fanout.json").read_text())
    baseline = results["trees"]["baseline"]
    # Other worktrees, and other runs' baselines, may come and go meanwhile: ours must be gone.
    assert baseline["root"] in result.stdout.splitlines()[0]
    assert baseline["root"] not in worktrees()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert baseline["commit"] == head and baseline["root"] != str(REPO_ROOT)
    assert not Path(baseline["root"]).exists()
    runs = {(s["tree"], s["consumers"]): s for s in results["samples"]}
    assert set(runs) == {("baseline", 1), ("current", 1)}
    assert all(s["written"] == 2000 and s["daemon_us"] > 0 for s in runs.values())


def test_a_baseline_that_names_no_commit_is_refused_before_anything_starts(tmp_path) -> None:
    before = worktrees()
    result = subprocess.run(
        [sys.executable, "demo/fanout_bench.py", "--baseline", "no-such-ref",
         "--results", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "'no-such-ref' names no commit of this repository" in result.stderr
    assert not any("fanout-baseline-" in path for path in worktrees() - before)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_bench_stopped_midway_removes_the_baseline_worktree_and_its_processes(
    tmp_path, signum
) -> None:
    bench = subprocess.Popen(
        [sys.executable, "demo/fanout_bench.py", "--consumers", "2", "--messages", "50000",
         "--baseline", "HEAD",
         "--results", str(tmp_path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches
        # As a terminal starts it: a suite started in the background ignores SIGINT, and its
        # children would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert bench.stdout is not None
        header = bench.stdout.readline()  # printed once every part of the bench is up
        assert header.startswith("fan-out bench: baseline HEAD"), header
        baseline = header.split(" checked out in ")[1].strip()
        assert baseline in worktrees()
        # Once the daemon has children the bench holds its pid: a signal in the milliseconds
        # before subprocess.Popen returns would leave it orphaned, which the bench cannot help.
        wait_until(lambda: spawning(running_from(baseline)), timeout=60, message="no daemon")
        os.killpg(bench.pid, signum)
        _, stderr = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
        # Closed here too when an assertion above failed: left to the garbage collector, they
        # would fail whichever test runs next with an unraisable ResourceWarning.
        for stream in (bench.stdout, bench.stderr):
            if stream is not None:
                stream.close()
    assert bench.returncode == (130 if signum == signal.SIGINT else 128 + signum), stderr
    assert baseline not in worktrees()
    assert not os.path.exists(baseline)
    assert not running_from(baseline)


def running_from(directory: str) -> list[int]:
    """Processes run in ``directory`` or whose command line names it: the baseline's daemon
    (its command line is its process title once it runs, so the working directory tells)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                named = directory.encode() in (entry / "cmdline").read_bytes()
                if named or os.readlink(entry / "cwd") == os.path.realpath(directory):
                    found.append(int(entry.name))
    return found


def spawning(pids: list[int]) -> bool:
    """Whether any of ``pids`` has a child process."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) in pids:
                    return True
    return False


def test_the_chart_draws_both_trees_with_a_gap_where_a_count_was_not_run(tmp_path) -> None:
    table = medians([
        sample("baseline", 1, 100_000, 6.0, 10.0),
        sample("baseline", 2, 90_000, 6.5, 12.0),
        sample("current", 1, 100_000, 6.0, 10.0),
    ])  # fmt: skip
    draw_chart(table, "fan-out", tmp_path / "fanout.png")
    assert (tmp_path / "fanout.png").read_bytes().startswith(b"\x89PNG")
