"""A handler module that imports in the daemon's main process (which checks HANDLER at start)
and raises on import in a consumer process: a consumer that fails outside its watched threads."""

from __future__ import annotations

import multiprocessing
from typing import Any

if multiprocessing.current_process().name != "MainProcess":
    raise RuntimeError("this handler module refuses to load in a consumer process")


def handle(message: dict[str, Any]) -> dict[str, Any]:
    return message
