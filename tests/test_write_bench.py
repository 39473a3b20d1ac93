"""The write bench runs, at a tiny size: its designs still match the script it measures.

The bench asserts inside each run that every design appended every message once; the
``lookups`` reference is today's script with its ``SADD`` taken out by text, which breaks
loudly here, not in the next full run, when the script's ``SADD`` line changes.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_the_write_bench_runs_every_design_and_prints_its_table() -> None:
    tiny = ["--messages", "1000", "--prefill", "1000", "--rounds", "1"]
    result = subprocess.run(
        [sys.executable, "demo/write_bench.py", *tiny],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"dedup", "locks", "pipelines", "lookups", "append"}
    assert rows["locks"][-1] == "1.00x"
    # Only the designs that remember ids have a dedup size: today's digests, the lock keys.
    assert 40 < float(rows["dedup"][4]) < 80 and float(rows["locks"][4]) > 80
    assert rows["lookups"][4] == "nan" and float(rows["append"][4]) == 0
