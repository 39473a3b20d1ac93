"""The control plane end to end: two daemons as two hosts on one real redis-server.

``processor scale`` splits the group over the hosts, a killed host's share moves to the other,
``processor stop`` stops every daemon with exit 0 and keeps new ones from starting until
``processor start``; idle stop and autoscale. Published and written are compared each time.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import faults_support
from tests.faults_support import (
    CONSUMERS,
    HEARTBEAT_TTL_MS,
    Daemon,
    client,
    daemon_env,
    running,
    start_publisher,
)
from tests.helpers import processor_cli, wait_until

WAIT_S = 30.0
HOSTS = "processor:hosts"


def start_host(procs: Any, url: str, host_id: str, count: int = 1, **overrides: object) -> Daemon:
    env = daemon_env(url, "partitioned", count, {"HOST_ID": host_id, **overrides})
    return Daemon(procs, procs.start(["demo/consume.py"], env=env), url, count)


def command(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m processor ARGS``, as an operator would run it."""
    return processor_cli(*args, env={**os.environ, "REDIS_URL": url})


def wait_for_sizes(redis_client: redis.Redis, daemons: dict[str, Daemon], want: dict[str, int]):
    """Each daemon runs its share, and the group lists exactly that many consumers."""

    def matched() -> bool:
        for name, daemon in daemons.items():
            assert daemon.proc.poll() is None, f"{name} exited:\n{daemon.log()[-3000:]}"
        sizes = {name: len(daemon.consumers()) for name, daemon in daemons.items()}
        return sizes == want and redis_client.llen(CONSUMERS) == sum(want.values())

    wait_until(matched, WAIT_S, message=f"hosts never ran {want}")


def check_published(redis_url: str, publisher: Any, why: str) -> str:
    """These tests publish no invalid payloads."""
    return faults_support.check_published(redis_url, publisher, why, invalid={})


def test_scale_splits_the_group_a_dead_host_hands_over_and_stop_stops_every_host(
    procs, redis_url, tmp_path
):
    redis_client = client(redis_url)
    hosts = {
        "host-a": start_host(procs, redis_url, "host-a", MAX_CONSUMERS=4),
        "host-b": start_host(procs, redis_url, "host-b", MAX_CONSUMERS=4),
    }
    a, b = hosts["host-a"], hosts["host-b"]
    # No desired size yet: each host runs its own CONSUMERS_COUNT.
    wait_for_sizes(redis_client, hosts, {"host-a": 1, "host-b": 1})
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 12.0, rate=1000)
    publisher.wait_published(500)

    done = command(redis_url, "scale", "5")
    assert done.returncode == 0, done.stderr
    assert "desired unset -> 5" in done.stdout and "host-a, host-b" in done.stdout
    wait_for_sizes(redis_client, hosts, {"host-a": 3, "host-b": 2})
    assert re.search(r"desired unset -> 5 by processor scale .*: share 1 -> 3", a.log())
    # processor status shows the desired size and each host's share (reported at its beat).
    wait_until(
        lambda: re.search(r"host-a\s+\d+\s+3\s+3\s+4\n", command(redis_url, "status").stdout),
        WAIT_S,
        message="processor status never showed host-a running its share of 3",
    )
    assert "control: desired 5 (set by processor scale" in command(redis_url, "status").stdout

    assert command(redis_url, "scale", "2").returncode == 0
    wait_for_sizes(redis_client, hosts, {"host-a": 1, "host-b": 1})
    assert "desired 5 -> 2 by processor scale" in b.log()

    # A whole host killed: its registration expires and its share moves to the other.
    os.killpg(b.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    b.proc.wait()
    del hosts["host-b"]
    wait_for_sizes(redis_client, hosts, {"host-a": 2})
    moved_s = time.monotonic() - killed_at
    assert "host host-b left: share 1 -> 2" in a.log()
    # Within the heartbeat TTL plus two seconds, with a margin for a loaded 2-core machine.
    assert moved_s < HEARTBEAT_TTL_MS / 1000 + 2 + 3, f"share moved after {moved_s:.1f} s"
    summary = check_published(redis_url, publisher, "scale and host kill")
    print(f"share moved {moved_s:.2f} s after the kill; {summary}")

    # The host comes back, takes its share again; then the whole group is stopped.
    hosts["host-b"] = b = start_host(procs, redis_url, "host-b", MAX_CONSUMERS=4)
    wait_for_sizes(redis_client, hosts, {"host-a": 1, "host-b": 1})
    consumers = a.consumers() | b.consumers()
    stopped = command(redis_url, "stop")
    assert stopped.returncode == 0, stopped.stderr
    for name, daemon in hosts.items():
        assert daemon.proc.wait(timeout=WAIT_S) == 0, f"{name}:\n{daemon.log()[-3000:]}"
        assert "stopping gracefully: the group is asked to stop: processor stop" in daemon.log()
    assert not [pid for pid in consumers if running(pid)]
    assert redis_client.llen(CONSUMERS) == 0
    assert redis_client.zcard(HOSTS) == 0  # both deregistered on the way out

    # While the stop key is set, a daemon says so and exits; processor start clears it.
    refused = start_host(procs, redis_url, "host-c")
    assert refused.proc.wait(timeout=WAIT_S) == 0
    assert "not starting: the group is asked to stop" in refused.log()
    cleared = command(redis_url, "start")
    assert cleared.returncode == 0 and "group stop cleared" in cleared.stdout
    redis_client.close()


def test_a_host_id_already_live_is_refused(procs, redis_url):
    first = start_host(procs, redis_url, "twin")
    redis_client = client(redis_url)
    wait_until(lambda: redis_client.llen(CONSUMERS) == 1, WAIT_S, message="first twin")
    second = start_host(procs, redis_url, "twin")
    assert second.proc.wait(timeout=WAIT_S) == 2
    assert "invalid HOST_ID: 'twin' is already registered by a live daemon" in second.log()
    assert first.proc.poll() is None
    redis_client.close()


def test_idle_stop_ends_the_daemon_after_the_group_goes_quiet(procs, redis_url, tmp_path):
    daemon = start_host(procs, redis_url, "idle-host", IDLE_STOP=2)
    redis_client = client(redis_url)
    wait_until(lambda: redis_client.llen(CONSUMERS) == 1, WAIT_S, message="consumer not listed")
    redis_client.close()
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 2.0, rate=500)
    summary = check_published(redis_url, publisher, "idle stop")
    quiet_since = time.monotonic()
    assert daemon.proc.wait(timeout=WAIT_S) == 0, daemon.log()[-3000:]
    waited = time.monotonic() - quiet_since
    log = daemon.log()
    assert "idle: the group received and wrote nothing for 2 s (IDLE_STOP)" in log
    assert "daemon stopped" in log
    print(f"idle stop {waited:.1f} s after the last write; {summary}")


def test_autoscale_grows_under_load_and_shrinks_when_idle(procs, redis_url, tmp_path: Path):
    # A handler that waits 2 ms per message: one consumer drains about 450 msg/s, so 1,200 msg/s
    # needs three; the waits hold no CPU, so this fits on two cores.
    daemon = start_host(
        procs,
        redis_url,
        "auto-host",
        HANDLER="demo.bench_handlers:io_2ms",
        AUTOSCALE="1:3",
        AUTOSCALE_INTERVAL="1",
        AUTOSCALE_COOLDOWN="1.5",
        MAX_CONSUMERS=3,
    )
    redis_client = client(redis_url)
    wait_until(lambda: redis_client.llen(CONSUMERS) == 1, WAIT_S, message="first consumer")
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 6.0, rate=1200)
    wait_until(lambda: len(daemon.consumers()) >= 3, WAIT_S, message="autoscale never reached 3")
    summary = check_published(redis_url, publisher, "autoscale")
    wait_until(lambda: len(daemon.consumers()) == 1, WAIT_S, message="autoscale never shrank")
    log = daemon.log()
    decided = r"autoscale \(host auto-host decides for the group\): (\d+) -> (\d+): "
    grew = re.findall(decided + "behind", log)
    shrank = re.findall(decided + "idle", log)
    assert grew and shrank, log[-4000:]
    assert all(int(new) > int(old) for old, new in grew)
    assert all(int(new) == int(old) - 1 for old, new in shrank)
    status = command(redis_url, "status")
    assert "last autoscale decision:" in status.stdout
    daemon.stop("autoscale")
    redis_client.close()
    print(f"grew {grew}, shrank {shrank}; {summary}")


@pytest.mark.slow
def test_a_storm_of_resizes_and_a_host_kill_lose_nothing(procs, redis_url, tmp_path, seed):
    """The desired size changed every 0.2-0.6 s for 10 s (faster than consumers start and
    drain), then a whole host killed mid-resize: nothing lost, nothing doubled, sizes converge."""
    rng = random.Random(seed)
    redis_client = client(redis_url)
    hosts = {name: start_host(procs, redis_url, name, MAX_CONSUMERS=4) for name in ("h-a", "h-b")}
    wait_for_sizes(redis_client, hosts, {"h-a": 1, "h-b": 1})
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 16.0, rate=2000)
    publisher.wait_published(1000)
    ends_at = time.monotonic() + 10
    while time.monotonic() < ends_at:
        size = rng.randint(1, 6)
        assert command(redis_url, "scale", str(size)).returncode == 0
        time.sleep(rng.uniform(0.2, 0.6))  # the fault's timing, not a synchronisation
    assert command(redis_url, "scale", "5").returncode == 0
    os.killpg(hosts["h-b"].pid, signal.SIGKILL)
    hosts["h-b"].proc.wait()
    del hosts["h-b"]
    wait_for_sizes(redis_client, hosts, {"h-a": 4})  # its ceiling: one short
    summary = check_published(redis_url, publisher, f"FAULT_SEED={seed} resize storm")
    assert "4 short" in hosts["h-a"].log() or "1 short" in hosts["h-a"].log()
    print(summary)
    redis_client.close()
