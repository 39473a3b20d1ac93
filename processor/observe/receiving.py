"""``processor_consumer_receiving``, exported by the supervisor at scrape time.

A consumer's own gauge would keep the value it last wrote: a consumer stopped (SIGSTOP), or
whose heartbeat thread is stuck, would show 1 for good. The supervisor reads what each consumer
reported in shared memory and believes it only while recent, so a silent consumer shows 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class Receiving(NamedTuple):
    role: str  # "reader" or "fed"
    pid: int
    receiving: bool


class ConsumersReceiving(Collector):
    """``consumers()`` gives each local consumer that has reported, at each scrape."""

    def __init__(self, consumers: Callable[[], list[Receiving]]) -> None:
        self._consumers = consumers

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "processor_consumer_receiving",
            "1 while a consumer receives its messages: a reader subscribed, a fed consumer fed "
            "by a reader (label role); 0 in a gap, or once it has not reported for "
            "HEARTBEAT_TTL_MS",
            labels=["role", "pid"],
        )
        for consumer in self._consumers():
            gauge.add_metric([consumer.role, str(consumer.pid)], int(consumer.receiving))
        yield gauge
