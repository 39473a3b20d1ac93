"""Stopping the local consumers: a graceful stop within SHUTDOWN_GRACE, then the stragglers
killed, with what each held said in the log."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.resource_tracker
import os
import signal
import time
from collections.abc import Callable, Sequence

from processor.errors import ExitCode
from processor.group.slot import Slot

log = logging.getLogger(__name__)


def stop_consumers(
    slots: Sequence[Slot], grace_s: float, evict: Callable[[Slot], None]
) -> tuple[ExitCode, int]:
    """Forwards the stop to every consumer, waits for their flush, kills stragglers.

    Returns the exit code and how many messages the killed consumers held at their last beat.
    """
    running = [slot for slot in slots if slot.process is not None]
    for slot in running:
        if slot.process is not None and slot.process.pid:
            kill(slot.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for slot in running:
        if slot.process is not None:
            slot.process.join(max(0.0, deadline - time.monotonic()))
    code = ExitCode.OK
    killed_holding = 0
    for slot in running:
        process = slot.process
        if process is None:
            continue
        if process.is_alive() and not slot.stats.consumer_id:
            # Still starting (importing, subscribing; a spawn of many on a loaded host can
            # outlast the grace): never registered, so it owned nothing and holds nothing.
            log.info(
                "consumer pid %s was still starting after SHUTDOWN_GRACE: stopping it "
                "(never registered, it holds nothing)",
                process.pid,
            )
            if process.pid:
                kill(process.pid, signal.SIGKILL)
            process.join(5)
            evict(slot)
        elif process.is_alive():
            held = slot.stats.get("held")
            killed_holding += held
            log.error(
                "consumer pid %s did not stop in time: killing it; it held %d unwritten "
                "messages at its last step (lost)",
                process.pid,
                held,
            )
            if process.pid:
                kill(process.pid, signal.SIGKILL)
            process.join(5)
            code = ExitCode.CONSUMER_ERROR
        elif process.exitcode != 0:
            log.error("consumer pid %s exited with code %s", process.pid, process.exitcode)
            code = ExitCode.CONSUMER_ERROR
    return code, killed_holding


def stop_resource_tracker() -> None:
    """Reaps the resource tracker that starting spawned processes forked: otherwise it
    outlives us for a moment, orphaned to init (a leftover in our process group)."""
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        stop()


def kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
