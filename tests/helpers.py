"""Small helpers shared by the test suites."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from processor.observe.logs import Tagged
from processor.store.keys import Keys

REPO_ROOT = Path(__file__).resolve().parent.parent


def list_live_consumer(
    client: Any, keys: Keys, consumer_id: str = "live-1", ttl_ms: int = 60_000
) -> None:
    """A consumer the tools take for live: listed, with a heartbeat key (no process behind)."""
    client.rpush(keys.consumers, consumer_id)
    client.set(keys.heartbeat(consumer_id), "token", px=ttl_ms)


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> None:
    """Poll predicate until it is truthy; raise AssertionError once timeout seconds have passed.

    A callable ``message`` is called at the failure, so it can show the state that failed
    (an f-string shows the state before the wait)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            said = message() if callable(message) else message
            raise AssertionError(said or f"condition not met within {timeout:g} s")
        time.sleep(interval)


def tagged(tag: str) -> Tagged:
    """A logger for a component under test whose lines start with ``tag``, as a consumer's do."""
    return Tagged(logging.getLogger("tests"), lambda: tag)


def logged(record: logging.LogRecord) -> str:
    """A record's message as a text line shows it: a Tagged logger's tag first."""
    return f"{getattr(record, 'tag', '')}{record.getMessage()}"


def processor_cli(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m processor ARGS`` from the repository, as an operator runs it; its output as
    text."""
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
