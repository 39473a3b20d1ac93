"""Logging set-up, called by entry points only (never at import time), and the adapter that
starts a component's lines with who logs them."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)


class Tagged(logging.LoggerAdapter[logging.Logger]):
    """A logger whose lines start with who logs them, as ``tag()`` says at the time of the
    line: "[<consumer id or joining> pid=N]" for a consumer (its id changes as it rejoins)."""

    def __init__(self, logger: logging.Logger, tag: Callable[[], str]) -> None:
        super().__init__(logger, {})
        self._tag = tag

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return f"{self._tag()} {msg}", kwargs

    def on(self, logger: logging.Logger) -> Tagged:
        """The same tag on another module's logger: each line keeps its module's name."""
        return Tagged(logger, self._tag)
