"""A consumer's subscriptions: one reader on a single Redis, one per partition on a cluster."""

from __future__ import annotations

import time
from collections.abc import Callable

from processor.config import RedisSettings
from processor.consumer.subscriber import Gap, Subscriber
from processor.consumer.threads import OnFailure
from processor.observe.logs import Tagged
from processor.store.cluster import ClusterMap
from processor.store.keys import Keys
from processor.store.partitions import hash_slot


def _primary_locator(settings: RedisSettings, channel: str) -> Callable[[], str]:
    cluster = ClusterMap(settings)
    slot = hash_slot(channel)
    return lambda: cluster.url(cluster.primary(slot))


class Subscribers:
    """A subscribing consumer's subscriptions (a reader's, or every consumer's with race): one
    subscriber thread on a single Redis, one per partition on a cluster.

    Each reads every partition, so the ownership strategies and takeovers work as on one Redis;
    each subscriber thread reports its own gaps.
    """

    standing_by = False  # only a fed consumer stands by (Feed)

    def __init__(
        self,
        settings: RedisSettings,
        keys: Keys,
        deliver: Callable[[list[bytes]], None],
        on_gap: Callable[[Gap], None],
        tagged: Tagged,
        backoff_max_s: float,
        on_failure: OnFailure,
        on_recovered: Callable[[str], None] | None = None,
    ) -> None:
        channels = [partition.channel for partition in keys.partitions]
        if not keys.cluster:
            self.readers = [
                Subscriber(
                    settings,
                    channels,
                    deliver,
                    on_gap,
                    tagged,
                    backoff_max_s,
                    on_failure,
                    on_recovered=on_recovered,
                )
            ]
            return
        self.readers = [
            Subscriber(
                settings,
                [channel],
                deliver,
                on_gap,
                tagged,
                backoff_max_s,
                on_failure,
                locate=_primary_locator(settings, channel),
                name=f"subscriber-{index}",
                on_recovered=on_recovered,
            )
            for index, channel in enumerate(channels)
        ]

    def start(self) -> None:
        for reader in self.readers:
            reader.start()

    def stop(self) -> None:
        for reader in self.readers:
            reader.stop()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for reader in self.readers:
            reader.join(max(0.0, deadline - time.monotonic()))

    def reset(self) -> None:
        for reader in self.readers:
            reader.reset()

    def rename(self, member: str) -> bool:
        """Our subscriptions do not depend on who we are in the group (a Feed's does)."""
        return False

    def is_subscribed(self) -> bool:
        return all(reader.subscribed.is_set() for reader in self.readers)

    def wait_subscribed(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        return all(
            reader.subscribed.wait(max(0.0, deadline - time.monotonic())) for reader in self.readers
        )

    @property
    def received(self) -> int:
        return sum(reader.received for reader in self.readers)

    @property
    def subscriptions(self) -> int:
        return sum(reader.subscriptions for reader in self.readers)

    @property
    def gaps(self) -> int:
        return sum(reader.gaps for reader in self.readers)

    @property
    def gap_seconds(self) -> float:
        return sum(reader.gap_seconds for reader in self.readers)

    def connections(self) -> list[tuple[tuple[str, int] | None, int]]:
        """(node, client id) of each live subscription; node None on a single Redis."""
        found = []
        for reader in self.readers:
            # Read once: the reader clears both when its connection ends.
            address, client_id = reader.address, reader.client_id
            if client_id is None or (reader.sharded and address is None):
                continue
            if reader.subscribed.is_set():
                found.append((address, client_id))
        return found
