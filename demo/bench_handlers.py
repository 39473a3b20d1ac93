"""Handlers the benchmark runs: one that costs CPU, one that waits on I/O, and its async twin.

Named in ``HANDLER`` as ``demo.bench_handlers:<name>``; ``demo/bench.py`` puts the repository
root on ``PYTHONPATH`` so the spawned consumers can import them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

CPU_COST_NS = 100_000
IO_WAIT_S = 0.002


def cpu_100us(message: dict[str, Any]) -> dict[str, Any]:
    """Spins for 100 µs of this thread's CPU time.

    CPU time, not wall time: on a busy machine a spin timed by the wall clock would count the
    time it was preempted, and so cost less CPU than it claims.
    """
    end = time.thread_time_ns() + CPU_COST_NS
    while time.thread_time_ns() < end:
        pass
    return message


def io_2ms(message: dict[str, Any]) -> dict[str, Any]:
    """Waits 2 ms, as a call to another service would, holding no CPU (and no GIL)."""
    time.sleep(IO_WAIT_S)
    return message


async def async_io_2ms(message: dict[str, Any]) -> dict[str, Any]:
    """The ``async`` twin of :func:`io_2ms`: many of these can wait at once."""
    await asyncio.sleep(IO_WAIT_S)
    return message
