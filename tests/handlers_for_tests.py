"""Handlers for tests, importable as ``tests.handlers_for_tests:<name>`` (by consumers too).

Sleeping handlers wait on :data:`RELEASE` rather than ``time.sleep``, so a test can free the
pool threads they hold (``RELEASE.set()`` in teardown); a thread stuck in a handler would
otherwise keep the interpreter from exiting. They are still interrupted by a signal, so
``InlineRunner``'s SIGALRM timeout works on them.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import warnings
from collections import Counter
from typing import Any

SLEEP_FOREVER_S = 10.0
RELEASE = threading.Event()


class InFlight:
    """Counts calls running at the same time and remembers the most seen at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def enter(self) -> None:
        with self._lock:
            self.current += 1
            self.peak = max(self.peak, self.current)

    def leave(self) -> None:
        with self._lock:
            self.current -= 1

    def reset(self) -> None:
        with self._lock:
            self.current = 0
            self.peak = 0


IN_FLIGHT = InFlight()


def echo(message: dict[str, Any]) -> dict[str, Any]:
    return message


def raises(message: dict[str, Any]) -> dict[str, Any]:
    raise ValueError(f"boom for {message.get('message_id')}")


def returns_non_dict(message: dict[str, Any]) -> list[Any]:
    return [message.get("message_id")]


def sleeps_forever(message: dict[str, Any]) -> dict[str, Any]:
    """Blocks for SLEEP_FOREVER_S (10 s) unless RELEASE is set."""
    RELEASE.wait(SLEEP_FOREVER_S)
    return message


def slow_10ms(message: dict[str, Any]) -> dict[str, Any]:
    time.sleep(0.01)
    return message


def slow_100ms(message: dict[str, Any]) -> dict[str, Any]:
    """Sleeps 0.1 s and records how many calls overlap in IN_FLIGHT."""
    IN_FLIGHT.enter()
    try:
        time.sleep(0.1)
    finally:
        IN_FLIGHT.leave()
    return message


async def async_echo(message: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return message


async def async_raises(message: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    raise ValueError(f"async boom for {message.get('message_id')}")


async def async_sleeps_forever(message: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(SLEEP_FOREVER_S)
    return message


async def async_slow_100ms(message: dict[str, Any]) -> dict[str, Any]:
    """Sleeps 0.1 s and records how many calls overlap in IN_FLIGHT."""
    IN_FLIGHT.enter()
    try:
        await asyncio.sleep(0.1)
    finally:
        IN_FLIGHT.leave()
    return message


# The file whose existence says the handler below is fixed (set by the test that starts it).
FIXED_FILE_ENV = "PROCESSOR_TEST_FIXED_FILE"


def fails_odd_until_fixed(message: dict[str, Any]) -> dict[str, Any]:
    """Raises for a message with an odd ``n`` until the file named by FIXED_FILE_ENV exists."""
    if message.get("n", 0) % 2 == 1 and not os.path.exists(os.environ[FIXED_FILE_ENV]):
        raise RuntimeError(f"not fixed yet: {message.get('message_id')}")
    return message


TRIES: Counter[str] = Counter()


def fails_twice_then_works(message: dict[str, Any]) -> dict[str, Any]:
    """Raises on the first two calls for each message_id (counted in this process)."""
    message_id = str(message.get("message_id"))
    TRIES[message_id] += 1
    if TRIES[message_id] <= 2:
        message["changed by a failed call"] = True
        raise RuntimeError(f"try {TRIES[message_id]} of {message_id}")
    return message


NOT_CALLABLE = 42


def warns_and_raises(message: dict[str, Any]) -> dict[str, Any]:
    """A warning (shown once per process by Python's default filter), then an exception."""
    warnings.warn("this handler is deprecated", UserWarning, stacklevel=1)
    raise ValueError(f"boom for {message.get('message_id')}")
