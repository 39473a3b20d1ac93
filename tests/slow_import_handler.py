"""A handler whose module takes as long to import as a test wants: ``HANDLER=
tests.slow_import_handler:echo`` with ``SLOW_IMPORT_DIR`` set. The import touches ``importing``
in that directory and waits (at most a minute) until ``go`` exists there, so a test can signal
the daemon while it is still loading its handler."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_WAIT_AT_MOST_S = 60.0


def _hold_the_import() -> None:
    directory = os.environ.get("SLOW_IMPORT_DIR")
    if not directory:
        return
    (Path(directory) / "importing").touch()
    deadline = time.monotonic() + _WAIT_AT_MOST_S
    while not (Path(directory) / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


_hold_the_import()


def echo(message: dict[str, Any]) -> Any:
    return message
