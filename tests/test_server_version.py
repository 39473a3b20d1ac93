"""The server's version at start: too old a Redis is refused with one line and exit 2; Valkey is
named as Valkey (it reports Redis 7.2.4 as its ``redis_version``)."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator

import pytest

from processor.errors import ExitCode
from processor.store.version import server_of, unsupported
from tests.conftest import Processes
from tests.faults_support import FAST_SETTINGS

EXIT_WITHIN_S = 30.0


@pytest.mark.parametrize(
    ("info", "refused"),
    [
        ({"redis_version": "6.0.16"}, "Redis 6.0.16, older than 6.2"),
        ({"redis_version": "5.0.7"}, "Redis 5.0.7, older than 6.2"),
        ({"redis_version": "6.2.0"}, None),
        ({"redis_version": "7.0.15"}, None),
        ({"redis_version": "10.0.0"}, None),
        # Valkey's redis_version is the Redis it forked from; its own version is what counts.
        ({"redis_version": "7.2.4", "valkey_version": "7.2.5"}, None),
        ({"redis_version": "7.2.4", "valkey_version": "9.1.2"}, None),
        ({"redis_version": "7.2.4", "valkey_version": "7.0.0"}, "Valkey 7.0.0, older than 7.2"),
        # A server that does not say is let through: the access check names what it refuses.
        ({"redis_version": "unknown"}, None),
        ({}, None),
    ],
)
def test_servers_older_than_the_commands_we_send_are_refused(info, refused):
    problem = unsupported(info)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(refused), problem
        assert "SMISMEMBER" in problem


def test_valkey_is_named_by_its_own_version():
    assert server_of({"redis_version": "7.2.4", "valkey_version": "8.1.1"}) == ("Valkey", "8.1.1")
    assert server_of({"redis_version": "7.0.15"}) == ("Redis", "7.0.15")


class _OldRedis(socketserver.StreamRequestHandler):
    """Speaks just enough RESP for a client to connect: INFO says Redis 6.0.16, every other
    command is +OK (CLIENT SETNAME, CLIENT SETINFO, PING), so the version alone can refuse."""

    def handle(self) -> None:
        while command := self._read_command():
            if command[0].upper() == b"INFO":
                body = b"# Server\r\nredis_version:6.0.16\r\nredis_mode:standalone\r\n"
                self.wfile.write(b"$%d\r\n%s\r\n" % (len(body), body))
            else:
                self.wfile.write(b"+OK\r\n")
            self.wfile.flush()

    def _read_command(self) -> list[bytes]:
        header = self.rfile.readline()
        if not header.startswith(b"*"):
            return []
        command = []
        for _ in range(int(header[1:])):
            length = int(self.rfile.readline()[1:])
            command.append(self.rfile.read(length + 2)[:-2])
        return command


@pytest.fixture
def old_redis() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _OldRedis)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    finally:
        server.shutdown()
        server.server_close()


def test_a_redis_older_than_6_2_stops_the_daemon_with_one_line_and_exit_2(
    procs: Processes, old_redis: str
):
    env = {**FAST_SETTINGS, "REDIS_URL": old_redis, "CONSUMERS_COUNT": "1"}
    proc = procs.start(["-m", "processor", "consume"], env=env)
    code = proc.wait(timeout=EXIT_WITHIN_S)
    output = procs.output(proc)
    assert code == ExitCode.CONFIG, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert errors == [
        f"python -m processor consume: error: Redis at {old_redis} is Redis 6.0.16, older than "
        "6.2, the oldest it runs on (it sends SMISMEMBER and CLIENT LIST ID): upgrade the server"
    ], output[-3000:]
    assert "consumer slot" not in output, "consumers were started"
