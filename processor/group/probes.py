"""The supervisor's metrics and probes: the local group's gauges, and ``/metrics``, ``/healthz``
and ``/readyz`` served for the whole host (see :mod:`processor.observe.health`); the one notion
of ready, which systemd's READY=1 follows too."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from processor.config import Settings
from processor.errors import ConfigError
from processor.group.slot import Slot
from processor.observe.health import HealthServer
from processor.observe.metrics import prepare_multiprocess_dir, remove_multiprocess_dir
from processor.version import version

if TYPE_CHECKING:
    from processor.observe.receiving import Receiving

log = logging.getLogger(__name__)

# /healthz fails once the supervisor's loop has not come round for this long.
STALLED_S = 5.0


class Probes:
    """Started with METRICS_PORT, before any consumer: the consumers inherit the directory of
    prometheus-client's multiprocess files from the environment it sets."""

    def __init__(
        self,
        settings: Settings,
        slots: Callable[[], list[Slot]],
        stopping: threading.Event,
        loop_tick: Callable[[], float],
    ) -> None:
        self._slots = slots
        self._stopping = stopping
        self._loop_tick = loop_tick
        self._directory = prepare_multiprocess_dir()
        # Imported only now: prometheus-client reads the directory's variable at import.
        from prometheus_client import Counter, Gauge

        self._live = Gauge(
            "processor_consumers_live",
            "Local consumers subscribed and registered",
            multiprocess_mode="livemax",
        )
        self._target = Gauge(
            "processor_consumers_target",
            "Consumers this host should run: its share of the group's desired size, or "
            "CONSUMERS_COUNT without one",
            multiprocess_mode="livemax",
        )
        self._restarts = Counter("processor_consumer_restarts", "Local consumers replaced")
        Gauge(
            "processor_build_info",
            "Always 1: the daemon's version and Python's, as labels",
            ["version", "python"],
            multiprocess_mode="livemax",
        ).labels(version(), platform.python_version()).set(1)
        from processor.observe.processes import ProcessUsage
        from processor.observe.receiving import ConsumersReceiving

        try:
            self._server = HealthServer(
                settings.metrics_addr,
                settings.metrics_port,
                self._alive,
                self._ready,
                ProcessUsage(self._processes),
                ConsumersReceiving(self._receiving),
            )
        except OSError as error:
            remove_multiprocess_dir(self._directory)
            raise ConfigError(
                f"invalid METRICS_PORT/METRICS_ADDR: cannot serve on "
                f"{settings.metrics_addr}:{settings.metrics_port}: {error.strerror}"
            ) from None
        self._server.start()
        log.info(
            "metrics on http://%s:%d/metrics, probes /healthz /readyz",
            settings.metrics_addr,
            self._server.port,
        )

    def update(self, target: int) -> None:
        """Once per supervisor loop: live and target consumers."""
        self._live.set(sum(slot.is_ready() for slot in self._slots()))
        self._target.set(target)

    def exited(self, pid: int | None, replaced: bool) -> None:
        """A consumer process ended: its live gauges go, and a replacement is counted."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        if replaced:
            self._restarts.inc()

    def close(self) -> None:
        self._server.close()
        remove_multiprocess_dir(self._directory)

    def _processes(self) -> list[tuple[str, int]]:
        """The local processes, named for their CPU and memory: a consumer as its log lines are."""
        found = [("supervisor", os.getpid())]
        for slot in self._slots():
            if slot.process is not None and slot.process.pid is not None:
                found.append((f"consumer-{slot.index}", slot.process.pid))
        return found

    def _receiving(self) -> list[Receiving]:
        """Each local consumer that has reported since it started: a reader subscribed, a fed
        consumer fed, as the supervisor believes it (:meth:`Slot.is_receiving`)."""
        from processor.observe.receiving import Receiving

        found = []
        for slot in self._slots():
            process = slot.process
            if process is not None and process.pid is not None and slot.stats.reported_once():
                role = "reader" if slot.stats.get("reader") else "fed"
                found.append(Receiving(role, process.pid, slot.is_receiving()))
        return found

    def _alive(self) -> tuple[bool, str]:
        stalled_s = time.monotonic() - self._loop_tick()
        if self._stopping.is_set():
            return False, "stopping"
        if stalled_s > STALLED_S:
            return False, f"supervisor loop stalled for {stalled_s:.1f} s"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        return readiness(self._slots(), self._stopping)


def readiness(slots: list[Slot], stopping: threading.Event) -> tuple[bool, str]:
    """Whether the local group is ready, and why: ``/readyz`` and systemd's READY=1."""
    if stopping.is_set():
        return False, "stopping"
    silent = [slot.index for slot in slots if not slot.reports()]
    waiting = [slot.index for slot in slots if slot.reports() and not slot.is_ready()]
    why = []
    if silent:
        why.append("not reporting (starting, exited, stopped or stuck): slots " + listed(silent))
    if waiting:
        why.append("not receiving and registered: slots " + listed(waiting))
    if why:
        return False, "; ".join(why)
    readers = sum(slot.stats.get("reader") for slot in slots)
    return True, (
        f"ok: {len(slots)} consumers registered and receiving: {readers} readers subscribed, "
        f"{len(slots) - readers} fed by them"
    )


def listed(indexes: list[int]) -> str:
    return ", ".join(map(str, indexes))
