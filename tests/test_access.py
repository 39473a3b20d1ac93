"""Credentials and ACL permissions, against a real redis-server with a password and ACL users.

Refused at start: one line naming the setting and the cause (never the secret), exit code 2.
Refused after a successful start (a rotated password): an error on every attempt, retried with
back-off, and the daemon carries on once the password works again. Not reachable at start within
STARTUP_TIMEOUT: one line naming the cause, exit code 4.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from demo.redis_server import RedisServer, free_port
from processor.config import Settings
from processor.errors import ExitCode, StartupTimeout
from processor.group import startup
from processor.store.access import ACL_RULES
from tests.conftest import REPO_ROOT, Processes
from tests.faults_support import (
    CHANNEL,
    FAST_SETTINGS,
    OUTPUT,
    Daemon,
    Expected,
    check_streams,
    publish_invalid,
    settle,
    start_publisher,
    subscribers,
)
from tests.helpers import wait_until

PASSWORD = "s3cret-pass"
NEW_PASSWORD = "rotated-pass"
EXIT_WITHIN_S = 30.0


@pytest.fixture
def secured() -> Iterator[RedisServer]:
    server = RedisServer(extra_config={"requirepass": PASSWORD})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(secured: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(secured.url)
    try:
        yield client
    finally:
        client.close()


def url_for(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def start(procs: Processes, url: str, count: int = 1) -> object:
    env = {**FAST_SETTINGS, "REDIS_URL": url, "CONSUMERS_COUNT": str(count)}
    return procs.start(["demo/consume.py"], env=env)


def refused_at_start(procs: Processes, url: str, secret: str) -> str:
    """Runs the daemon, which must exit 2 with one error line; returns that line."""
    proc = start(procs, url)
    code = proc.wait(timeout=EXIT_WITHIN_S)  # type: ignore[attr-defined]
    output = procs.output(proc)  # type: ignore[arg-type]
    assert code == ExitCode.CONFIG, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("consume.py: error:")]
    assert len(errors) == 1, output[-3000:]
    assert secret not in output, "the secret was printed"
    assert "consumer slot" not in output, "consumers were started"
    return errors[0]


def test_a_wrong_password_is_a_config_error_that_names_redis_url(procs, secured):
    line = refused_at_start(procs, url_for(secured, "default", "wrong-password"), "wrong-password")
    assert "REDIS_URL" in line and "***" in line, line
    assert "invalid username-password pair" in line, line


def test_a_wrong_password_for_a_cluster_is_a_config_error_too(procs, secured):
    """The cluster client wraps the node's refusal in its own exception; it is still one line."""
    url = url_for(secured, "default", "wrong-password")
    proc = procs.start(
        ["demo/consume.py"],
        env={**FAST_SETTINGS, "REDIS_URL": url, "REDIS_CLUSTER": "true"},
    )
    assert proc.wait(timeout=EXIT_WITHIN_S) == ExitCode.CONFIG, procs.output(proc)[-3000:]
    output = procs.output(proc)
    assert "consume.py: error: Redis refused the credentials in REDIS_URL" in output, output
    assert "wrong-password" not in output


def test_redis_cluster_against_a_single_redis_is_a_config_error(procs, redis_url):
    proc = procs.start(
        ["demo/consume.py"],
        env={**FAST_SETTINGS, "REDIS_URL": redis_url, "REDIS_CLUSTER": "true"},
    )
    assert proc.wait(timeout=EXIT_WITHIN_S) == ExitCode.CONFIG, procs.output(proc)[-3000:]
    assert "error: invalid REDIS_CLUSTER: " in procs.output(proc)
    assert "is not a Redis Cluster node" in procs.output(proc)


def test_no_password_at_all_is_a_config_error(procs, secured):
    line = refused_at_start(procs, f"redis://127.0.0.1:{secured.port}/0", PASSWORD)
    assert "REDIS_URL" in line, line


def test_an_acl_user_without_xadd_is_a_config_error_that_names_the_command(procs, secured, admin):
    admin.execute_command("ACL", "SETUSER", "writer", "on", ">w-pass", "~*", "&*", "+@all", "-xadd")
    line = refused_at_start(procs, url_for(secured, "writer", "w-pass"), "w-pass")
    assert "XADD on 'messages:processed'" in line, line
    assert "no permissions to run the 'xadd' command" in line, line


def test_an_acl_user_without_the_channel_is_a_config_error_that_names_it(procs, secured, admin):
    admin.execute_command(
        "ACL", "SETUSER", "deaf", "on", ">d-pass", "~*", "resetchannels", "&other:*", "+@all"
    )
    line = refused_at_start(procs, url_for(secured, "deaf", "d-pass"), "d-pass")
    assert f"SUBSCRIBE to INPUT_CHANNEL '{CHANNEL}'" in line, line


def test_an_acl_user_without_its_keys_is_a_config_error(procs, secured, admin):
    admin.execute_command("ACL", "SETUSER", "narrow", "on", ">n-pass", "~messages:*", "&*", "+@all")
    line = refused_at_start(procs, url_for(secured, "narrow", "n-pass"), "n-pass")
    assert "'consumer:ids'" in line and "processor:" in line, line


def test_a_password_rotated_under_a_running_daemon_is_logged_on_every_attempt_until_fixed(
    procs, secured, admin, tmp_path: Path
):
    count = 2
    proc = start(procs, secured.url, count)
    daemon = Daemon(procs, proc, secured.url, count)
    try:
        daemon.wait_in_step(30, "daemon did not start")
        admin.config_set("requirepass", NEW_PASSWORD)
        # Existing connections stay authenticated: drop them, as a restart of Redis would.
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

        def refusals() -> int:
            return sum(
                " ERROR " in line and "refused our credentials" in line
                for line in daemon.log().splitlines()
            )

        wait_until(lambda: refusals() >= 6, 30, message="refusals not logged on every attempt")
        assert proc.poll() is None, "the daemon exited"  # type: ignore[attr-defined]
        assert PASSWORD not in daemon.log() and NEW_PASSWORD not in daemon.log()

        admin.config_set("requirepass", PASSWORD)
        wait_until(lambda: subscribers(admin) == count, 30, message="not subscribed again")
        daemon.wait_in_step(30, "consumers did not rejoin")
        ids = [f"after-rotation-{n}" for n in range(200)]
        for message_id in ids:
            assert admin.publish(CHANNEL, f'{{"message_id": "{message_id}"}}') >= 1

        def written() -> list[str]:
            return [fields[b"message_id"].decode() for _, fields in admin.xrange(OUTPUT)]

        wait_until(lambda: set(ids) <= set(written()), 30, message="not written after the fix")
        assert sorted(written()) == sorted(ids)
        daemon.stop("after the rotation")
    finally:
        daemon.close()


def test_the_documented_least_privilege_user_runs_the_daemon_end_to_end(
    procs, secured, admin, tmp_path: Path
):
    readme = (REPO_ROOT / "README.md").read_text()
    assert ACL_RULES in " ".join(readme.split()), "README's ACL line differs from ACL_RULES"
    admin.execute_command("ACL", "SETUSER", "processor", "on", ">p-pass", *ACL_RULES.split())
    url = url_for(secured, "processor", "p-pass")
    count = 2
    proc = start(procs, url, count)
    daemon = Daemon(procs, proc, secured.url, count)
    try:
        daemon.wait_in_step(30, "the daemon did not start as the ACL user")
        publish_invalid(admin, "acl")
        publisher = start_publisher(procs, secured.url, tmp_path / "record.txt", 2.0, rate=1000)
        publisher.wait_published(1000)
        victim = next(iter(daemon.consumers()))
        os.kill(victim, signal.SIGKILL)  # eviction and takeover run as the ACL user too
        daemon.wait_in_step(30, "the killed consumer was not replaced")
        publisher.finish()
        expected = Expected(publisher.records())
        assert settle(admin, expected), check_streams(admin, expected, "acl")
        check_streams(admin, expected, "acl")
        status = subprocess.run(
            [sys.executable, "-m", "processor", "status", "--redis-url", url],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        assert "NOPERM" not in daemon.log() and "no permissions" not in daemon.log()
        daemon.stop("acl")
    finally:
        daemon.close()
    assert "p-pass" not in procs.output(proc)


def test_an_acl_user_without_hset_is_refused_at_start_not_in_its_first_heartbeat(
    procs, secured, admin
):
    admin.execute_command(
        "ACL", "SETUSER", "nohset", "on", ">h-pass", *ACL_RULES.replace("+hset ", "").split()
    )
    line = refused_at_start(procs, url_for(secured, "nohset", "h-pass"), "h-pass")
    assert "HSET on 'processor:consumer:access-check'" in line, line


def test_a_replica_is_a_config_error_that_names_the_primary(procs, redis_server):
    replica = RedisServer(extra_config={"replicaof": f"127.0.0.1 {redis_server.port}"})
    replica.start()
    try:
        line = refused_at_start(procs, replica.url, "no secret here")
    finally:
        replica.stop()
    assert "is a read-only replica (READONLY): point REDIS_URL at the primary" in line


def test_a_full_redis_at_start_is_waited_for_not_refused(procs, redis_url, r):
    """Queued in MULTI, a write is refused as it would be run (OOM): the state of the server,
    not our permissions. The daemon waits, then starts."""
    r.config_set("maxmemory", "1")
    try:
        proc = start(procs, redis_url)
        wait_until(
            lambda: "Redis (start-up check) refused: OOM " in procs.output(proc),  # type: ignore[arg-type]
            EXIT_WITHIN_S,
        )
        assert proc.poll() is None  # type: ignore[attr-defined]
        assert "consumer slot" not in procs.output(proc)  # type: ignore[arg-type]
    finally:
        r.config_set("maxmemory", "0")
    wait_until(lambda: r.llen("consumer:ids") == 1, EXIT_WITHIN_S)
    os.killpg(proc.pid, signal.SIGTERM)  # type: ignore[attr-defined]
    assert proc.wait(timeout=EXIT_WITHIN_S) == 0  # type: ignore[attr-defined]


def test_redis_unreachable_past_the_startup_timeout_is_one_line_and_exit_4(procs):
    port = free_port()  # nothing listens there
    env = {**FAST_SETTINGS, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "STARTUP_TIMEOUT": "3"}
    began = time.monotonic()
    proc = procs.start(["demo/consume.py"], env=env)
    assert proc.wait(timeout=15) == ExitCode.STARTUP_TIMEOUT, procs.output(proc)[-3000:]
    assert time.monotonic() - began >= 3
    output = procs.output(proc)
    errors = [line for line in output.splitlines() if line.startswith("consume.py: error:")]
    assert len(errors) == 1, output[-3000:]
    assert re.fullmatch(
        rf"consume\.py: error: Redis at redis://127\.0\.0\.1:{port}/0 not reachable within "
        r"STARTUP_TIMEOUT \(3 s; waited \d+\.\d s\): \d+ failed attempts; the last: "
        rf"Error 111 connecting to 127\.0\.0\.1:{port}\. Connection refused",
        errors[0],
    ), errors[0]
    assert "consumer slot" not in output


def test_the_startup_timeout_also_bounds_the_supervisors_own_connection():
    """A cluster that went away after the start-up check: the supervisor's cluster client
    cannot read the layout, and gives up at the same deadline."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=url, redis_cluster=True, startup_timeout_s=1)
    with pytest.raises(StartupTimeout, match=r"not reachable within STARTUP_TIMEOUT \(1 s"):
        startup._connect(settings, threading.Event(), deadline=time.monotonic() + 0.5)
