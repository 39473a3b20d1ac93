"""The ``processor`` command: subcommands, help and error lines that name the command as typed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from processor.config import LOG_LEVELS, MAX_CONSUMERS_PER_HOST, STRATEGIES
from processor.errors import ExitCode
from processor.version import checkout_version, version
from tests.conftest import REPO_ROOT
from tests.helpers import processor_cli


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("REDIS_")}
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"  # unreachable: nothing here may need a server
    env["COLUMNS"] = "200"
    return processor_cli(*args, env=env)


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
        "(choose from consume, publish, status, scale, stop, start, dead-letters, replay)"
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


def pyproject_version() -> str:
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_version_in_pyproject(flag):
    result = run(flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"processor {pyproject_version()}\n"
    assert result.stderr == ""


def test_the_version_of_a_checkout_is_its_pyproject_and_nothing_else(tmp_path: Path):
    assert version() == pyproject_version()
    assert checkout_version(tmp_path) is None  # no pyproject.toml: the installed metadata decides
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\nversion = "9.9"\n')
    assert checkout_version(tmp_path) is None  # another project's checkout around the package
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "processor"\nversion = "1.2"\n')
    assert checkout_version(tmp_path) == "1.2"
    (tmp_path / "pyproject.toml").write_text("[project\n")
    assert checkout_version(tmp_path) is None


# (command, a flag of another command): refused, not ignored nor read as an abbreviation.
FOREIGN_FLAGS = (
    (("status",), ["--consumers-count", "3"]),
    (("status",), ["--consumers", "3"]),  # once read as --consumers-list 3
    (("status",), ["--strategy", "race"]),
    (("publish",), ["--consumers-count", "3"]),
    (("consume",), ["--json"]),
    (("consume",), ["--target-duration-s", "3"]),
    (("scale", "3"), ["--batch-size", "10"]),
    (("stop",), ["--handler", "x:y"]),
)


@pytest.mark.parametrize(("command", "flag"), FOREIGN_FLAGS, ids=lambda item: " ".join(item))
def test_a_command_refuses_the_flags_of_another_in_one_line(command, flag):
    result = run(*command, *flag)
    prog = f"python -m processor {command[0]}"
    assert result.returncode == ExitCode.CONFIG == 2, result.stderr
    assert result.stderr == (
        f"{prog}: error: unrecognized arguments: {' '.join(flag)} "
        f"('{prog} --help' lists the flags it takes)\n"
    )
    assert result.stdout == ""


def test_help_shows_the_choices_of_strategy_and_loglevel():
    consume_help = " ".join(run("consume", "--help").stdout.split())
    assert f"(one of: {', '.join(STRATEGIES)})" in consume_help
    assert f"(one of: {', '.join(LOG_LEVELS)})" in consume_help
    status_help = " ".join(run("status", "--help").stdout.split())
    assert f"(one of: {', '.join(LOG_LEVELS)})" in status_help
    assert "--strategy" not in status_help


def test_status_tells_no_live_consumer_from_an_unreachable_redis(redis_url):
    unreachable = run("status")
    assert unreachable.returncode == ExitCode.UNREACHABLE == 1, unreachable.stderr
    assert "cannot read the group" in unreachable.stderr
    empty = run("status", "--redis-url", redis_url)
    assert empty.returncode == ExitCode.NO_CONSUMER == 5, empty.stderr
    assert "NO LIVE CONSUMER" in empty.stdout and empty.stderr == ""


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


# -- malformed addresses: one line and exit 2 in every command ---------------------------------

# Generous on a shared machine: a well-formed run of any of them takes a fraction of a second.
EXIT_WITHIN_S = 15.0
ANY_COMMAND = (("consume",), ("status",), ("publish",), ("scale", "3"), ("stop",), ("start",))
# Arguments, REDIS_URL ({server}: the test server's address) and what the line must name.
BAD_ADDRESSES = {
    "garbage": ([], "garbage", "invalid REDIS_URL (from environment): 'garbage'"),
    "http": ([], "http://{server}/0", "is not a redis://, rediss:// or unix:// URL"),
    "port-not-a-number": ([], "redis://127.0.0.1:notaport/0", "'notaport'"),
    "ipv6-unclosed": ([], "redis://[::1", "Invalid IPv6 URL"),
    # Once read as database 0 by redis-py, silently.
    "path-not-a-database": ([], "redis://{server}/abc", "'/abc' is not a database number"),
    # Only the server knows how many databases it has (16 here): refused when first connected.
    "database-out-of-range": ([], "redis://{server}/99", "invalid REDIS_URL: Redis at"),
    "port-flag-too-high": (
        ["--redis-port", "99999"],
        "",
        "invalid REDIS_PORT (from flag --redis-port): '99999' must be <= 65535",
    ),
}


def run_until_exit(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m processor ARGS`` with quiet logs, killed with its children if it overruns."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("REDIS_")}
    # Quiet: the one error line is then all of stderr. A publisher wrongly let through stops.
    base.update(LOGLEVEL="WARNING", TARGET_DURATION="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "processor", *args],
        cwd=REPO_ROOT,
        env={**base, **{key: value for key, value in env.items() if value}},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", f"still running after {EXIT_WITHIN_S:g} s"
    finally:
        # Its own session: a daemon wrongly let through takes its consumers along.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("command", ANY_COMMAND, ids=lambda command: command[0])
@pytest.mark.parametrize("case", BAD_ADDRESSES)
def test_a_malformed_address_is_one_line_and_exit_2(command, case, redis_server, redis_url):
    extra, url, fragment = BAD_ADDRESSES[case]
    url = url.format(server=f"127.0.0.1:{redis_server.port}")
    result = run_until_exit([*command, *extra], REDIS_URL=url)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"python -m processor {command[0]}: error: invalid "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_the_database_out_of_range_line_says_which_database(redis_server):
    result = run_until_exit(["status"], REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/99")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(
        "/99 has no database 99 (DB index is out of range; see its 'databases' setting)"
    )


def test_a_metrics_port_out_of_range_is_one_line_and_exit_2(redis_url):
    result = run_until_exit(["consume"], REDIS_URL=redis_url, METRICS_PORT="70000")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "python -m processor consume: error: invalid METRICS_PORT (from environment): "
        "'70000' must be <= 65535"
    )


def test_scale_refuses_a_size_the_live_hosts_could_never_run(redis_url, r):
    over = run_until_exit(["scale", str(MAX_CONSUMERS_PER_HOST + 1)], REDIS_URL=redis_url)
    assert over.returncode == 2, over.stderr
    assert over.stderr.strip() == (
        f"python -m processor scale: error: invalid size: {MAX_CONSUMERS_PER_HOST + 1} is more "
        f"than {MAX_CONSUMERS_PER_HOST}, the most one host may run (at most "
        f"{MAX_CONSUMERS_PER_HOST} consumers per host; start more hosts first)"
    )
    assert r.hget("processor:control", "desired") is None
    # Two live hosts (their registry entries expire a minute from now, by Redis's clock).
    seconds, microseconds = r.time()
    expires_ms = seconds * 1000 + microseconds // 1000 + 60_000
    r.zadd("processor:hosts", {"vm-1": expires_ms, "vm-2": expires_ms})
    twice = 2 * MAX_CONSUMERS_PER_HOST
    over = run_until_exit(["scale", str(twice + 1)], REDIS_URL=redis_url)
    assert over.returncode == 2, over.stderr
    assert f"is more than {twice}, the most the 2 live hosts may run" in over.stderr
    within = run_until_exit(["scale", str(twice)], REDIS_URL=redis_url)
    assert within.returncode == 0, within.stderr
    assert r.hget("processor:control", "desired") == str(twice)
