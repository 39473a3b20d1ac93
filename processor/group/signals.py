"""Live control of a running daemon, as gunicorn does it: SIGTTIN, SIGTTOU, SIGHUP.

``SIGTTIN`` adds a consumer, ``SIGTTOU`` removes one (it drains and writes what it holds, as on
a graceful stop), ``SIGHUP`` re-reads the configuration (file, environment, flags) and applies
what can change without restarting the daemon by replacing the consumers one at a time, each
draining before its successor starts; what cannot is logged as needing a restart.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass

from processor.config import Settings

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
