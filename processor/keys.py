"""Names of every Redis key the daemon owns, built in one place.

User-facing names (channel, streams, consumer list) come from the settings as they are; the
daemon's own bookkeeping lives under ``key_prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor.config import GroupSettings


@dataclass(frozen=True)
class Keys:
    channel: str
    output: str
    dead: str
    consumers: str
    lock_prefix: str
    seen_prefix: str
    legacy_locks: str
    heartbeat_prefix: str
    info_prefix: str
    stats: str
    gaps: str
    departures: str
    control: str
    stop: str
    hosts: str
    host_info: str
    autoscale_lock: str

    @classmethod
    def from_settings(cls, settings: GroupSettings) -> Keys:
        prefix = settings.key_prefix
        return cls(
            channel=settings.input_channel,
            output=settings.output_stream,
            dead=settings.dead_letter_stream,
            consumers=settings.consumers_list,
            lock_prefix=f"{prefix}:lock:",
            seen_prefix=f"{prefix}:seen:",
            legacy_locks=f"{prefix}:legacy-locks",
            heartbeat_prefix=f"{prefix}:heartbeat:",
            info_prefix=f"{prefix}:consumer:",
            stats=f"{prefix}:stats",
            gaps=f"{prefix}:gaps",
            departures=f"{prefix}:departures",
            control=f"{prefix}:control",
            stop=f"{prefix}:stop",
            hosts=f"{prefix}:hosts",
            host_info=f"{prefix}:host-info",
            autoscale_lock=f"{prefix}:autoscale-lock",
        )

    def heartbeat(self, consumer_id: str) -> str:
        return self.heartbeat_prefix + consumer_id

    def info(self, consumer_id: str) -> str:
        return self.info_prefix + consumer_id

    def lock(self, lock_id: str) -> str:
        return self.lock_prefix + lock_id
