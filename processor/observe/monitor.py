"""The throughput line: rates for the whole group (from Redis) and for each local consumer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from processor.config import Settings
from processor.consumer.membership import read_view
from processor.consumer.stats import ConsumerStats
from processor.observe.counters import read_counters
from processor.store.connection import REDIS_ERRORS, command_client
from processor.store.keys import Keys

log = logging.getLogger(__name__)

# What a consumer's counters move with: a change in any of them is not idle.
_ACTIVITY = ("received", "written", "dead")


class Monitor:
    """Turns counters into per-second rates over each interval, and lists subscription gaps.

    At idle (nothing received, written or dead since the last report, and the line unchanged:
    same buffered counts, members, gaps) the same line every MONITORING_INTERVAL says nothing
    new: it is logged once every MONITORING_IDLE_INTERVAL instead.
    """

    def __init__(
        self,
        settings: Settings,
        local: Callable[[], Sequence[ConsumerStats]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = Keys.from_settings(settings)
        self._client = command_client(settings, name="processor-monitor")
        self._local = local
        self._clock = clock
        # Less half a report interval: reports come on a grid, and one a hair early must not
        # put the idle line off by a whole interval.
        self._idle_report_s = settings.monitor_idle_interval_s - settings.monitor_interval_s / 2
        self._last_time = clock()
        self._last_group: tuple[int, int] | None = None
        self._logged_line = ""
        self._logged_at = 0.0
        # By slot object: slots come and go with SIGTTIN and SIGTTOU.
        self._last_local = {id(stats): stats.snapshot() for stats in local()}
        self._gaps_seen = f"{int(time.time() * 1000)}-0"

    def report(self, final: bool = False) -> None:
        now = self._clock()
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time = now
        group_before = self._last_group
        group_text, group = self._group_part(elapsed)
        parts = [group_text]
        moved = self._last_group != group_before
        local_parts = []
        consumers: dict[str, dict[str, float]] = {}
        for index, stats in enumerate(self._local()):
            current = stats.snapshot()
            previous = self._last_local.get(id(stats), current)
            self._last_local[id(stats)] = current
            moved = moved or any(current[name] != previous[name] for name in _ACTIVITY)
            rate = (current["written"] - previous["written"]) / elapsed
            dead = current["dead"] - previous["dead"]
            name = stats.consumer_id or f"slot{index}"
            extra = f" dead={dead}" if dead else ""
            # What it keeps for takeovers: flat once TAKEOVER_BUFFER_MS of traffic is in.
            extra += f" buffered={current['buffered']:,}" if current["buffered"] else ""
            local_parts.append(f"{name}={rate:,.0f}/s{extra}")
            consumers[name] = {
                "written_per_s": round(rate, 1),
                "dead": dead,
                "buffered": current["buffered"],
            }
        parts.append("local " + " ".join(local_parts))
        parts.append(self._gaps_part())
        line = " | ".join(parts)
        idle = not moved and line == self._logged_line
        if idle and not final and now - self._logged_at < self._idle_report_s:
            return
        self._logged_line, self._logged_at = line, now
        # The same figures as fields, for a JSON log (LOG_FORMAT=json).
        fields = {"group": group, "consumers": consumers}
        log.info("%sthroughput %s", "final " if final else "", line, extra=fields)

    def _group_part(self, elapsed: float) -> tuple[str, dict[str, object]]:
        try:
            counters = read_counters(self._client, self._keys)
            written, dead = counters["written"], counters["dead"]
            live = len(read_view(self._client, self._keys).members)
        except REDIS_ERRORS as error:
            # A report is never worth the supervisor: whatever Redis says, say it and go on.
            self._last_group = None
            return f"group: Redis unavailable ({type(error).__name__}: {error})", {}
        previous, self._last_group = self._last_group, (written, dead)
        fields: dict[str, object] = {"live": live, "written": written, "dead": dead}
        if previous is None:
            return f"group {live} consumers: total written={written:,} dead={dead:,}", fields
        rate = (written - previous[0]) / elapsed
        dead_rate = (dead - previous[1]) / elapsed
        fields.update(written_per_s=round(rate, 1), dead_per_s=round(dead_rate, 1))
        text = f"group {live} consumers: {rate:>9,.0f} msg/s written, {dead_rate:,.0f}/s dead"
        return text, fields

    def _gaps_part(self) -> str:
        try:
            reply: Any = self._client.xread({self._keys.gaps: self._gaps_seen}, count=1000)
        except REDIS_ERRORS:
            return "gaps unknown"
        lengths = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._gaps_seen = entry_id.decode()
                lengths.append((int(fields[b"end_ms"]) - int(fields[b"start_ms"])) / 1000)
        if not lengths:
            return "gaps 0"
        return f"gaps {len(lengths)} (longest {max(lengths):.3f} s)"

    def close(self) -> None:
        self._client.close()
