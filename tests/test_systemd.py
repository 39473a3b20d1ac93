"""systemd's notification protocol: the notifier against a socket of our own, and the daemon
run with NOTIFY_SOCKET as systemd runs a Type=notify service."""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from processor.errors import ConfigError
from processor.group.systemd import Notifier, address_problem
from processor.loading import load_daemon_settings
from tests.conftest import REPO_ROOT, Processes

CONSUME = "demo/consume.py"
CONSUMERS = "consumer:ids"
WAIT_S = 30.0
FAST = {
    "HEARTBEAT_INTERVAL_MS": "200",
    "HEARTBEAT_TTL_MS": "1000",
    "TAKEOVER_BUFFER_MS": "3000",
    "DEDUP_WINDOW_MS": "60000",
}
READY_LINE = re.compile(r"\[(\S+) pid=\d+\] consumer ready")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's; its address as NOTIFY_SOCKET carries it."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


def receive(sock: socket.socket, timeout: float = WAIT_S) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def receive_until(sock: socket.socket, wanted: str) -> tuple[str, list[str]]:
    """The first datagram with the line ``wanted``, and every datagram before it."""
    before: list[str] = []
    deadline = time.monotonic() + WAIT_S
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted} within {WAIT_S:g} s; received {before}"
        datagram = receive(sock, left)
        if wanted in datagram.splitlines():
            return datagram, before
        before.append(datagram)


# -- the notifier -----------------------------------------------------------------------------


def test_ready_is_sent_once_and_status_when_it_changes(listener):
    sock, path = listener
    notifier = Notifier(path)
    notifier.update((False, "not subscribed and registered: slots 0, 1"))
    assert receive(sock) == "STATUS=not subscribed and registered: slots 0, 1"
    notifier.update((False, "not subscribed and registered: slots 0, 1"))  # unchanged: nothing
    notifier.update((True, "ok: 2 consumers subscribed and registered"))
    assert receive(sock) == "READY=1\nSTATUS=ok: 2 consumers subscribed and registered"
    notifier.update((False, "not subscribed and registered: slots 1"))
    notifier.update((True, "ok: 2 consumers subscribed and registered"))
    assert receive(sock) == "STATUS=not subscribed and registered: slots 1"
    assert receive(sock) == "STATUS=ok: 2 consumers subscribed and registered"  # no READY again
    notifier.stopping()
    assert receive(sock) == "STOPPING=1\nSTATUS=stopping: the consumers flush and leave"
    notifier.update((False, "stopping"))  # the stop's message was the last one
    with pytest.raises(TimeoutError):
        receive(sock, 0.2)


def test_a_declined_start_is_ready_then_stopping(listener):
    sock, path = listener
    Notifier(path).declined("not starting: the group is asked to stop")
    assert receive(sock) == "READY=1"
    assert receive(sock) == "STOPPING=1\nSTATUS=not starting: the group is asked to stop"


def test_an_abstract_socket_name_starts_with_an_at_sign():
    name = f"processor-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        notifier = Notifier("@" + name)
        notifier.update((True, "ok"))
        assert receive(sock) == "READY=1\nSTATUS=ok"
        notifier.stopping()
        assert receive(sock).startswith("STOPPING=1\n")
    finally:
        sock.close()


def test_without_a_socket_nothing_is_sent_and_a_failed_send_never_raises(tmp_path, caplog):
    Notifier("").update((True, "ok"))  # not under systemd
    gone = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="processor.group.systemd"):
        gone.update((False, "waiting"))
        gone.update((True, "ok"))
        gone.stopping()
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings
    assert "systemd notification to NOTIFY_SOCKET=" in warnings[0]
    assert "later failures are not logged" in warnings[0]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("run/notify", "neither a socket path (/...) nor an abstract socket name (@...)"),
        ("vsock:2:1234", "neither a socket path"),
        ("/" + "x" * 107, "longer than a Unix socket address (107 bytes)"),
    ],
)
def test_a_wrong_notify_socket_is_one_line_naming_it(value, words):
    assert address_problem("/run/systemd/notify") is None
    assert address_problem("@abstract") is None
    with pytest.raises(ConfigError) as caught:
        load_daemon_settings([], {"NOTIFY_SOCKET": value})
    assert str(caught.value).startswith("invalid NOTIFY_SOCKET (from environment): ")
    assert words in str(caught.value)


# -- the daemon under a socket of ours, as under systemd -------------------------------------


def test_the_daemon_is_ready_once_its_consumers_are_registered_and_says_when_it_stops(
    procs: Processes, redis_url: str, r: redis.Redis, listener
):
    sock, path = listener
    env = {"REDIS_URL": redis_url, "CONSUMERS_COUNT": "3", "NOTIFY_SOCKET": path, **FAST}
    daemon = procs.start([CONSUME], env=env)
    ready, before = receive_until(sock, "READY=1")
    # Read at once: by the time READY=1 is sent, every consumer is registered and ready.
    listed = r.llen(CONSUMERS)
    readied = set(READY_LINE.findall(procs.output(daemon)))
    assert listed == 3, (listed, before, procs.output(daemon)[-3000:])
    assert len(readied) == 3, procs.output(daemon)[-3000:]
    assert ready == (
        "READY=1\nSTATUS=ok: 3 consumers registered and receiving: 2 readers subscribed, "
        "1 fed by them"
    )
    assert all(datagram.startswith("STATUS=") for datagram in before), before
    daemon.send_signal(signal.SIGTERM)
    stopping, between = receive_until(sock, "STOPPING=1")
    assert "READY=1" not in "\n".join(between)
    assert stopping == "STOPPING=1\nSTATUS=stopping: the consumers flush and leave"
    assert daemon.wait(timeout=WAIT_S) == 0, procs.output(daemon)[-3000:]
    assert r.llen(CONSUMERS) == 0


def test_a_daemon_that_declines_to_start_is_a_clean_start_and_stop(
    procs: Processes, redis_url: str, listener
):
    """Under a group stop the daemon exits 0 at once: READY=1 first, or systemd would count
    the start as failed and Restart=on-failure would start it again and again."""
    sock, path = listener
    stopped = subprocess.run(
        [sys.executable, "-m", "processor", "stop", "--redis-url", redis_url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert stopped.returncode == 0, stopped.stderr
    env = {"REDIS_URL": redis_url, "CONSUMERS_COUNT": "1", "NOTIFY_SOCKET": path, **FAST}
    daemon = procs.start([CONSUME], env=env)
    assert receive(sock) == "READY=1"
    assert receive(sock).startswith("STOPPING=1\nSTATUS=not starting: the group is asked to stop")
    assert daemon.wait(timeout=WAIT_S) == 0, procs.output(daemon)[-3000:]
