"""The package as a user installs it: the wheel into a fresh virtual environment, then the
installed ``processor`` command end to end against a real redis-server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from demo.redis_server import free_port
from tests.conftest import REPO_ROOT
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(240)


def build_wheel(tmp_path: Path) -> Path:
    """The wheel built from the files git tracks (a build/ left in the checkout could hold
    files that no longer exist)."""
    source = tmp_path / "source"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        target = source / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name.decode(), target)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return next(dist.glob("processor-*.whl"))


def test_the_wheel_installs_and_its_command_consumes_end_to_end(tmp_path: Path, redis_url, r):
    wheel = build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    installed = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    # Nothing from the checkout: another directory, no PYTHONPATH.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    metrics_port = free_port()
    env |= {"REDIS_URL": redis_url, "CONSUMERS_COUNT": "2", "PYTHONUNBUFFERED": "1"}
    env["METRICS_PORT"] = str(metrics_port)
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import processor; print(processor.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(env_dir) in where.stdout
    # Installed, the version comes from the distribution's metadata: no pyproject.toml here.
    shown = subprocess.run(
        [str(bin_dir / "processor"), "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        expected = tomllib.load(handle)["project"]["version"]
    assert (shown.returncode, shown.stdout) == (0, f"processor {expected}\n"), shown.stderr
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 (closed in finally)
    daemon = subprocess.Popen(
        [str(bin_dir / "processor"), "consume"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: r.llen("consumer:ids") == 2, 60, message="consumers not listed")
        record = tmp_path / "record.txt"
        command = [str(bin_dir / "processor"), "publish", "--rate", "1000"]
        command += ["--target-duration-s", "1", "--record", str(record)]
        published = subprocess.run(
            command,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert published.returncode == 0, published.stderr[-2000:]
        ids = {line.split()[0] for line in record.read_text().splitlines()}
        assert len(ids) == 1000

        def written() -> list[str]:
            return [fields["message_id"] for _, fields in r.xrange("messages:processed")]

        wait_until(lambda: len(written()) >= len(ids), 30, message="not all written")
        assert sorted(written()) == sorted(ids)
        status = subprocess.run(
            [str(bin_dir / "processor"), "status", "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        assert len(json.loads(status.stdout)["consumers"]) == 2
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        with urllib.request.urlopen(f"{metrics_url}/readyz", timeout=5) as ready:
            assert ready.status == 200
        with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5) as scraped:
            assert b"processor_messages_written_total" in scraped.read()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        log.close()
    assert r.llen("consumer:ids") == 0


def test_the_wheel_carries_the_scripts_and_no_test_tooling(tmp_path: Path):
    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    for script in ("membership.lua", "leave.lua", "dedup_append.lua", "seen.lua", "bucket.lua"):
        assert f"processor/store/lua/{script}" in names
    assert not [name for name in names if name.startswith(("tests/", "demo/"))]
    assert not [name for name in names if "redis_server" in name]
    assert any(name.endswith("entry_points.txt") for name in names)
