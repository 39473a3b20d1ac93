"""The throughput line: rates for the whole group (from Redis) and for each local consumer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from processor.config import Settings
from processor.connection import REDIS_ERRORS, command_client
from processor.counters import read_counters
from processor.keys import Keys
from processor.membership import read_view
from processor.stats import ConsumerStats

log = logging.getLogger(__name__)


class Monitor:
    """Turns counters into per-second rates over each interval, and lists subscription gaps."""

    def __init__(self, settings: Settings, local: Callable[[], Sequence[ConsumerStats]]) -> None:
        self._keys = Keys.from_settings(settings)
        self._client = command_client(settings, name="processor-monitor")
        self._local = local
        self._last_time = time.monotonic()
        self._last_group: tuple[int, int] | None = None
        # By slot object: slots come and go with SIGTTIN and SIGTTOU.
        self._last_local = {id(stats): stats.snapshot() for stats in local()}
        self._gaps_seen = f"{int(time.time() * 1000)}-0"

    def report(self, final: bool = False) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time = now
        parts = [self._group_part(elapsed)]
        local_parts = []
        for index, stats in enumerate(self._local()):
            current = stats.snapshot()
            previous = self._last_local.get(id(stats), current)
            self._last_local[id(stats)] = current
            rate = (current["written"] - previous["written"]) / elapsed
            dead = current["dead"] - previous["dead"]
            name = stats.consumer_id or f"slot{index}"
            extra = f" dead={dead}" if dead else ""
            # What it keeps for takeovers: flat once TAKEOVER_BUFFER_MS of traffic is in.
            extra += f" buffered={current['buffered']:,}" if current["buffered"] else ""
            local_parts.append(f"{name}={rate:,.0f}/s{extra}")
        parts.append("local " + " ".join(local_parts))
        parts.append(self._gaps_part())
        log.info("%sthroughput %s", "final " if final else "", " | ".join(parts))

    def _group_part(self, elapsed: float) -> str:
        try:
            counters = read_counters(self._client, self._keys)
            written, dead = counters["written"], counters["dead"]
            live = len(read_view(self._client, self._keys).members)
        except REDIS_ERRORS as error:
            # A report is never worth the supervisor: whatever Redis says, say it and go on.
            self._last_group = None
            return f"group: Redis unavailable ({type(error).__name__}: {error})"
        previous, self._last_group = self._last_group, (written, dead)
        if previous is None:
            return f"group {live} consumers: total written={written:,} dead={dead:,}"
        rate = (written - previous[0]) / elapsed
        dead_rate = (dead - previous[1]) / elapsed
        return f"group {live} consumers: {rate:>9,.0f} msg/s written, {dead_rate:,.0f}/s dead"

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
