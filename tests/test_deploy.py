"""The operator files in docs/deploy/: the systemd unit and its environment file, read as
strictly as systemd reads them, checked against the daemon's settings, and verified by
``systemd-analyze verify`` where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from processor.config import DAEMON_OPTIONS
from processor.loading import load_daemon_settings
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "docs" / "deploy"
UNIT = DEPLOY / "processor.service"
ENV_FILE = DEPLOY / "processor.env"
# What the supervisor does after SHUTDOWN_GRACE (stragglers killed, the last report) needs
# a few seconds of TimeoutStopSec too.
STOP_MARGIN_S = 5

Unit = dict[str, dict[str, list[str]]]


def _value(number: int, line: str, pattern: str) -> tuple[str, str]:
    match = re.fullmatch(pattern, line)
    assert match, f"line {number}: {line!r} is not NAME=value"
    key, value = match.groups()
    # systemd keeps what follows '=' as the value, a comment included ('30 # > 10' is no time).
    assert not re.search(r"\s[#;]", value), f"line {number}: {key}'s value has a comment: {value!r}"
    assert value == value.strip(), f"line {number}: {key}'s value has spaces around it"
    return key, value


def parse_unit(text: str) -> Unit:
    """Our strict reading: each line is blank, a whole-line comment, a [Section] or Key=Value
    inside a section, and no value carries a comment."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip()[0] in "#;":
            continue
        if re.fullmatch(r"\[[A-Za-z]+\]", line):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, value = _value(number, line, r"([A-Z][A-Za-z]*)=(.*)")
        assert current is not None, f"line {number}: {key} outside any section"
        current.setdefault(key, []).append(value)
    return sections


def parse_env(text: str) -> dict[str, str]:
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, value = _value(number, line, r"([A-Z][A-Z0-9_]*)=(.*)")
        assert key not in values, f"line {number}: {key} set twice"
        values[key] = value
    return values


def seconds(value: str) -> int:
    assert value.isdigit(), f"{value!r}: plain seconds, so the test can compare them"
    return int(value)


def the(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def test_the_strict_reading_refuses_a_comment_after_a_value():
    with pytest.raises(AssertionError, match="TimeoutStopSec's value has a comment"):
        parse_unit("[Service]\nTimeoutStopSec=30    # > SHUTDOWN_GRACE\n")
    with pytest.raises(AssertionError, match="REDIS_URL's value has a comment"):
        parse_env("REDIS_URL=redis://h:6379/0 # the primary\n")
    with pytest.raises(AssertionError, match="outside any section"):
        parse_unit("Type=notify\n")


def test_the_unit_runs_the_daemon_as_a_notify_service():
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    assert the(unit, "Service", "Type") == "notify"
    assert the(unit, "Service", "NotifyAccess") == "main"
    assert the(unit, "Service", "ExecStart").endswith("/processor consume")
    assert the(unit, "Service", "KillMode") == "mixed"
    assert the(unit, "Service", "Restart") == "on-failure"
    # Exit 2, a wrong setting, is not retried.
    assert "2" in the(unit, "Service", "RestartPreventExitStatus").split()
    # A user of its own, made by systemd for each run.
    assert the(unit, "Service", "DynamicUser") == "yes"
    assert "User" not in service
    assert the(unit, "Service", "EnvironmentFile") == "/etc/processor/processor.env"


def test_the_environment_file_is_valid_settings_within_the_units_timeouts():
    values = parse_env(ENV_FILE.read_text())
    known = {option.env for option in DAEMON_OPTIONS}
    assert set(values) <= known, f"not settings of the daemon: {set(values) - known}"
    settings = load_daemon_settings([], values)
    unit = parse_unit(UNIT.read_text())
    stop_s = seconds(the(unit, "Service", "TimeoutStopSec"))
    assert stop_s >= settings.shutdown_grace_s + STOP_MARGIN_S
    start_s = seconds(the(unit, "Service", "TimeoutStartSec"))
    assert 0 < settings.startup_timeout_s < start_s
    # The file names where it is installed, as the unit reads it.
    assert ENV_FILE.read_text().startswith(f"# {the(unit, 'Service', 'EnvironmentFile')}:")


def _verify(unit_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on the unit, its ExecStart pointed at an executable that exists
    here (verify checks it)."""
    path = directory / "processor.service"
    path.write_text(unit_text.replace("/opt/processor/venv/bin/processor", sys.executable))
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_systemd_analyze_verifies_the_unit(tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip(
            "systemd-analyze not found (Debian package systemd): the strict reading above "
            "still checks the unit"
        )
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    broken = UNIT.read_text().replace("TimeoutStopSec=30", "TimeoutStopSec=30   # > grace")
    complaint = _verify(broken, tmp_path)
    assert "Failed to parse" in complaint.stderr, complaint.stderr
