"""CPU and memory of each local process, read from ``/proc`` at scrape time.

prometheus-client's own process collector reports only the process that serves ``/metrics``
and is not part of its multiprocess mode: this one reports the supervisor and every consumer,
labelled ``process="supervisor"`` or ``"consumer-N"`` (the process name of slot N's log
lines), so a dashboard keeps one series per slot across a consumer's restarts (the CPU counter
starts again at the new pid's 0, which ``rate()`` takes as a reset).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class Usage(NamedTuple):
    cpu_s: float
    rss_bytes: int


def usage(pid: int) -> Usage | None:
    """User plus system CPU time and resident memory of ``pid``; None once it has gone (or on a
    system without ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields count from its end.
    fields = text[text.rfind(b")") + 2 :].split()
    # Fields 14 and 15 (utime, stime) and 24 (rss, in pages), 1-based; fields[0] is field 3.
    return Usage((int(fields[11]) + int(fields[12])) / TICKS_PER_S, int(fields[21]) * PAGE_BYTES)


class ProcessUsage(Collector):
    """``processes()`` names the local processes at each scrape: (label, pid) pairs."""

    def __init__(self, processes: Callable[[], list[tuple[str, int]]]) -> None:
        self._processes = processes

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "processor_process_cpu_seconds",
            "User and system CPU time of a local process (supervisor or consumer slot)",
            labels=["process"],
        )
        memory = GaugeMetricFamily(
            "processor_process_resident_memory_bytes",
            "Resident memory of a local process (supervisor or consumer slot)",
            labels=["process"],
        )
        for name, pid in self._processes():
            found = usage(pid)
            if found is None:
                continue
            cpu.add_metric([name], found.cpu_s)
            memory.add_metric([name], found.rss_bytes)
        yield cpu
        yield memory
