"""Live control of a running daemon, as gunicorn does it: SIGTTIN, SIGTTOU, SIGHUP.

``SIGTTIN`` adds a consumer, ``SIGTTOU`` removes one (it drains and writes what it holds, as on
a graceful stop), ``SIGHUP`` re-reads the configuration (file, environment, flags) and applies
what can change without restarting the daemon by replacing the consumers one at a time, each
draining before its successor starts; what cannot is logged as needing a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass

from processor.config import MAX_CONSUMERS_PER_HOST, Settings

log = logging.getLogger(__name__)

CONTROL_SIGNALS = (signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP)
REQUESTS = {signal.SIGTTIN: "add", signal.SIGTTOU: "remove", signal.SIGHUP: "reload"}

# Applied to the consumers started after the reload (each consumer is replaced in turn).
LIVE_FIELDS = ("processing_batch_size", "batch_window_ms", "loglevel", "handler_concurrency")


@dataclass(frozen=True)
class ReloadPlan:
    settings: Settings  # the current settings with the live changes applied
    applied: list[str]  # "name old -> new"
    not_applied: list[str]  # "name old -> new": these need a restart of the daemon

    @property
    def replace_consumers(self) -> bool:
        return any(not change.startswith("loglevel ") for change in self.applied)


def plan_reload(current: Settings, reloaded: Settings) -> ReloadPlan:
    applied, not_applied, live = [], [], {}
    for item in dataclasses.fields(Settings):
        old, new = getattr(current, item.name), getattr(reloaded, item.name)
        if old == new:
            continue
        shown = "(secret)" if not item.repr else f"{old!r} -> {new!r}"
        if item.name in LIVE_FIELDS:
            live[item.name] = new
            applied.append(f"{item.name} {shown}")
        else:
            not_applied.append(f"{item.name} {shown}")
    return ReloadPlan(dataclasses.replace(current, **live), applied, not_applied)


def resized_count(request: str, local_count: int, group_sized: bool) -> int:
    """The local consumer count after a SIGTTIN ("add") or SIGTTOU ("remove"): unchanged, with
    a warning, while the group's size is set in Redis, at the last consumer, or at the bound."""
    signame = "SIGTTIN" if request == "add" else "SIGTTOU"
    if group_sized:
        log.warning(
            "%s ignored: the group's size is set in Redis (processor scale); "
            "use 'processor scale N'",
            signame,
        )
        return local_count
    if request == "remove" and local_count <= 1:
        log.warning("SIGTTOU ignored: the last consumer stays (stop the daemon instead)")
        return local_count
    if request == "add" and local_count >= MAX_CONSUMERS_PER_HOST:
        log.warning(
            "SIGTTIN ignored: %d consumers is the most one daemon runs (run more hosts)",
            local_count,
        )
        return local_count
    after = local_count + (1 if request == "add" else -1)
    log.info("%s: consumers %d -> %d", signame, local_count, after)
    return after
