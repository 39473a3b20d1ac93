"""The documentation cannot drift: the configuration reference is what the settings'
declarations render."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from processor.options import options_of
from processor.reference import COMMANDS, MACHINE_DEFAULTS, REGENERATE, render

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = REPO_ROOT / "docs" / "configuration.md"


def test_the_configuration_reference_is_what_the_settings_declare() -> None:
    assert REFERENCE.read_text() == render(), (
        f"docs/configuration.md differs from the settings' declarations: run `make docs` "
        f"({REGENERATE}) and commit the result"
    )


def test_the_regenerate_command_prints_the_reference() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "processor.reference"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert printed == render()


@pytest.mark.parametrize(("command", "cls"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_the_reference_lists_every_setting_of_every_command(command: str, cls: type) -> None:
    rows = {line.split("`")[1] for line in render().splitlines() if line.startswith("| `")}
    missing = [option.env for option in options_of(cls) if option.env not in rows]
    assert not missing, f"{command}: {missing} missing from the reference"


def test_machine_dependent_defaults_name_real_settings() -> None:
    names = {option.name for _, cls in COMMANDS for option in options_of(cls)}
    assert set(MACHINE_DEFAULTS) <= names
