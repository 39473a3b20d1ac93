"""Names of every Redis key the daemon owns, built in one place.

User-facing names (channel, streams, consumer list) come from the settings as they are; the
daemon's own bookkeeping lives under ``key_prefix``.

On a single Redis there is one partition with those names. On a Redis Cluster every key is
hash-tagged: the group's bookkeeping (membership, control plane) shares the tag ``{KEY_PREFIX}``,
so its scripts run on one slot, and partition p's channel, streams, dedup sets, counters and
fences share the tag of p (:func:`~processor.store.partitions.hash_tag`), so its atomic write
runs on one shard: ``messages:processed:{p0.1}``, ``processor:{p0.1}:seen:<bucket>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from processor.config import MAX_BATCH_SIZE, GroupSettings, RedisSettings
from processor.store.partitions import hash_tag, partition_of


def channels(settings: RedisSettings) -> list[str]:
    """The channel of each partition, in partition order (what publishers publish to)."""
    if not settings.redis_cluster:
        return [settings.input_channel]
    return [
        f"{settings.input_channel}:{{{hash_tag(p, settings.partitions)}}}"
        for p in range(settings.partitions)
    ]


@dataclass(frozen=True)
class PartitionKeys:
    """The keys of one partition: everything one atomic write touches, on one slot."""

    channel: str
    output: str
    dead: str
    stats: str
    seen_prefix: str
    # The bucket clock: the newest dedup bucket written, so writes never go back a bucket.
    seen_clock: str
    # Prefix of the per-partition fence keys (cluster); "" = the heartbeat key is the fence.
    fence_prefix: str
    # When each replayed message_id was last replayed (processor replay), by its digest.
    replayed: str


@dataclass(frozen=True)
class Keys:
    consumers: str
    heartbeat_prefix: str
    info_prefix: str
    gaps: str
    departures: str
    control: str
    stop: str
    hosts: str
    host_info: str
    autoscale_lock: str
    # The counters the host beat reads for idleness. On a cluster the writes count in the
    # partitions' own hashes and this one stays empty; the control plane sums those instead.
    group_stats: str
    partitions: tuple[PartitionKeys, ...]
    cluster: bool = False

    @classmethod
    def from_settings(cls, settings: GroupSettings) -> Keys:
        prefix = settings.key_prefix
        if not settings.redis_cluster:
            partition = PartitionKeys(
                channel=settings.input_channel,
                output=settings.output_stream,
                dead=settings.dead_letter_stream,
                stats=f"{prefix}:stats",
                seen_prefix=f"{prefix}:seen:",
                seen_clock=f"{prefix}:seen-clock",
                fence_prefix="",
                replayed=f"{prefix}:replayed",
            )
            return cls._group(prefix, settings.consumers_list, partition.stats, (partition,))
        partitions = tuple(
            cls._partition(settings, hash_tag(p, settings.partitions), channel)
            for p, channel in enumerate(channels(settings))
        )
        group = "{" + prefix + "}"
        consumers = f"{settings.consumers_list}:{group}"
        return cls._group(group, consumers, f"{group}:stats", partitions, cluster=True)

    @classmethod
    def _group(
        cls,
        prefix: str,
        consumers: str,
        group_stats: str,
        partitions: tuple[PartitionKeys, ...],
        cluster: bool = False,
    ) -> Keys:
        return cls(
            consumers=consumers,
            heartbeat_prefix=f"{prefix}:heartbeat:",
            info_prefix=f"{prefix}:consumer:",
            gaps=f"{prefix}:gaps",
            departures=f"{prefix}:departures",
            control=f"{prefix}:control",
            stop=f"{prefix}:stop",
            hosts=f"{prefix}:hosts",
            host_info=f"{prefix}:host-info",
            autoscale_lock=f"{prefix}:autoscale-lock",
            group_stats=group_stats,
            partitions=partitions,
            cluster=cluster,
        )

    @staticmethod
    def _partition(settings: GroupSettings, tag: str, channel: str) -> PartitionKeys:
        own = f"{settings.key_prefix}:{{{tag}}}"
        return PartitionKeys(
            channel=channel,
            output=f"{settings.output_stream}:{{{tag}}}",
            dead=f"{settings.dead_letter_stream}:{{{tag}}}",
            stats=f"{own}:stats",
            seen_prefix=f"{own}:seen:",
            seen_clock=f"{own}:seen-clock",
            fence_prefix=f"{own}:fence:",
            replayed=f"{own}:replayed",
        )

    @property
    def single(self) -> PartitionKeys:
        """The one partition of a group that has one (a single Redis, or PARTITIONS=1)."""
        if len(self.partitions) != 1:
            raise ValueError(f"{len(self.partitions)} partitions: name one")
        return self.partitions[0]

    # The single partition's names, for the code that knows it has one partition.
    @property
    def channel(self) -> str:
        return self.single.channel

    @property
    def output(self) -> str:
        return self.single.output

    @property
    def dead(self) -> str:
        return self.single.dead

    @property
    def stats(self) -> str:
        return self.single.stats

    @property
    def seen_prefix(self) -> str:
        return self.single.seen_prefix

    def partition_of(self, dedup_id: str) -> int:
        return partition_of(dedup_id, len(self.partitions))

    def script_calls(self, dedup_ids: Sequence[str]) -> list[tuple[int, list[int]]]:
        """The positions of ``dedup_ids`` as script calls, in partition order: one partition a
        call (it runs on that partition's primary) and at most MAX_BATCH_SIZE ids (Lua's unpack
        limit; on a cluster a batch holds that many per partition only on average, and ids can
        crowd into one partition)."""
        groups: dict[int, list[int]] = {}
        for index, dedup_id in enumerate(dedup_ids):
            groups.setdefault(self.partition_of(dedup_id), []).append(index)
        return [
            (partition, indices[start : start + MAX_BATCH_SIZE])
            for partition, indices in sorted(groups.items())
            for start in range(0, len(indices), MAX_BATCH_SIZE)
        ]

    def heartbeat(self, consumer_id: str) -> str:
        return self.heartbeat_prefix + consumer_id

    def fence(self, partition: int, consumer_id: str) -> str:
        """The key whose value a write to ``partition`` checks against the writer's token."""
        fence_prefix = self.partitions[partition].fence_prefix
        return fence_prefix + consumer_id if fence_prefix else self.heartbeat(consumer_id)

    def fences(self, consumer_id: str) -> list[str]:
        """The per-partition fence keys a consumer keeps alive (none on a single Redis)."""
        return [p.fence_prefix + consumer_id for p in self.partitions if p.fence_prefix]

    def info(self, consumer_id: str) -> str:
        return self.info_prefix + consumer_id
