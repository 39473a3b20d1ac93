"""The ``processor`` command: subcommands, help and error lines that name the command as typed."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("REDIS_")}
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"  # unreachable: nothing here may need a server
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m processor COMMAND")
    for command in ("consume", "publish", "status", "scale", "stop", "start"):
        assert f"  {command} " in result.stdout


def test_no_command_prints_the_usage_and_exits_2():
    result = run()
    assert result.returncode == 2
    assert "usage: python -m processor COMMAND" in result.stdout


def test_an_unknown_command_is_one_line_and_exit_2():
    result = run("consumme")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "python -m processor: error: unknown command 'consumme' "
        "(choose from consume, publish, status, scale, stop, start)"
    )


def test_subcommand_help_and_errors_name_the_command_as_typed():
    help_text = run("consume", "--help")
    assert help_text.returncode == 0
    assert help_text.stdout.startswith("usage: python -m processor consume")
    assert "--metrics-port METRICS_PORT" in help_text.stdout
    error = run("consume", "--consumers-count", "0")
    assert error.returncode == 2
    assert error.stderr.strip() == (
        "python -m processor consume: error: invalid CONSUMERS_COUNT (from flag "
        "--consumers-count): '0' must be >= 1"
    )
    publish = run("publish", "--batch-size", "x")
    assert publish.returncode == 2
    assert publish.stderr.startswith("python -m processor publish: error: invalid BATCH_SIZE")


def test_status_names_the_unreachable_server_without_a_secret():
    env_url = "redis://user:hunter2@127.0.0.1:1/0"
    result = run("status", "--redis-url", env_url)
    assert result.returncode == 1
    assert result.stderr.startswith("python -m processor status: error: cannot read the group")
    assert "hunter2" not in result.stderr and "user:***@" in result.stderr


def test_help_never_shows_a_password_from_the_environment():
    env = {**os.environ, "REDIS_URL": "redis://user:hunter2@127.0.0.1:1/0", "COLUMNS": "200"}
    for command in ("consume", "publish", "status", "scale", "stop", "start"):
        result = subprocess.run(
            [sys.executable, "-m", "processor", command, "--help"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0
        assert "hunter2" not in result.stdout + result.stderr


def test_scale_refuses_a_size_that_is_not_a_positive_whole_number():
    for args, fragment in (
        (("scale", "0"), "0 must be at least 1"),
        (("scale", "many"), "'many' is not a whole number"),
        (("scale",), "one of the arguments size --clear is required"),
        (("scale", "3", "--clear"), "not allowed with argument"),
    ):
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.splitlines()[-1].startswith("python -m processor scale: error:")
        assert fragment in result.stderr, (args, result.stderr)


def test_control_commands_name_the_unreachable_server_without_a_secret():
    for args in (("scale", "3"), ("stop",), ("start",)):
        result = run(*args, "--redis-url", "redis://user:hunter2@127.0.0.1:1/0")
        assert result.returncode == 1, (args, result.stderr)
        line = result.stderr.strip()
        assert line.startswith(f"python -m processor {args[0]}: error: Redis at redis://user:***@")
        assert "hunter2" not in line and "\n" not in line


def test_a_control_command_against_a_full_redis_says_it_refuses_writes(redis_url, r):
    r.config_set("maxmemory", "1")
    try:
        result = run("scale", "3", "--redis-url", redis_url)
    finally:
        r.config_set("maxmemory", "0")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("python -m processor scale: error: Redis at redis://127.0.0.1:"), line
    assert "refuses writes: OOM command not allowed when used memory" in line
