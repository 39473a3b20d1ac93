"""The version of the code that runs: ``processor --version``.

From a source checkout it is the ``pyproject.toml`` beside the package, since that is the code
running even when another copy is installed in the environment; from an installed package, its
distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

DISTRIBUTION = "processor"


def checkout_version(root: Path) -> str | None:
    """The version in ``root/pyproject.toml`` when it declares this project; None otherwise."""
    try:
        with open(root / "pyproject.toml", "rb") as handle:
            project = tomllib.load(handle).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != DISTRIBUTION or not isinstance(project.get("version"), str):
        return None
    return str(project["version"])


def version() -> str:
    """This package's version; "unknown" when neither a checkout nor metadata says."""
    found = checkout_version(Path(__file__).resolve().parent.parent)
    if found is not None:
        return found
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
