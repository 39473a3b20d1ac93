"""Logging set-up, called by entry points only (never at import time), and the adapter that
marks a component's lines with who logs them.

Two formats (``LOG_FORMAT``): ``text``, a line for people with a timezone-aware time, and
``json``, one JSON object per line for a log pipeline (python-json-logger renders it): UTC
ISO-8601 ``time``, ``level``, ``logger``, ``message``, ``pid``, ``process``, a consumer's
``consumer_id`` and ``slot`` on its lines, an event's ``extra=`` fields, and a ``traceback``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# ``tag`` is the text prefix a Tagged logger sets ("[<consumer id> pid=N] "); empty otherwise.
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(tag)s%(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(process)d %(processName)s"
JSON_NAMES = {
    "levelname": "level",
    "name": "logger",
    "process": "pid",
    "processName": "process",
    "exc_info": "traceback",
    "stack_info": "stack",
}


class TextFormatter(logging.Formatter):
    """The text line, its time in the host's zone with the offset, to the millisecond."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, defaults={"tag": ""})

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(sep=" ", timespec="milliseconds")


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        JSON_FIELDS,
        rename_fields=JSON_NAMES,
        timestamp="time",  # UTC, ISO-8601
        # The text prefix says again what consumer_id and pid say.
        reserved_attrs=[*RESERVED_ATTRS, "tag"],
    )


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger to stderr in ``log_format``; warnings go through it too, so a JSON log
    carries them as objects like every other line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)


class Tagged(logging.LoggerAdapter[logging.Logger]):
    """A logger whose lines say who logs them, as of the line: ``tag()`` starts a text line
    ("[<consumer id or joining> pid=N]" for a consumer, whose id changes as it rejoins), and
    ``fields()`` (a consumer's id and slot) become fields of a JSON line."""

    def __init__(
        self,
        logger: logging.Logger,
        tag: Callable[[], str],
        fields: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        super().__init__(logger, {})
        self._tag = tag
        self._fields = fields

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        tag = self._tag()
        fields = self._fields() if self._fields is not None else {}
        kwargs["extra"] = {
            **fields,
            **kwargs.get("extra", {}),
            "tag": f"{tag} " if tag else "",
        }
        return msg, kwargs

    def on(self, logger: logging.Logger) -> Tagged:
        """The same tag on another module's logger: each line keeps its module's name."""
        return Tagged(logger, self._tag, self._fields)
