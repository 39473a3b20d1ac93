"""A consumer's parts, built from its settings: the clients, membership, ownership, readers,
heartbeat, writer and write thread, wired to the consumer through its hooks."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from processor.config import Settings
from processor.consumer.dedup import SeenCheck, Window
from processor.consumer.feed import Feed
from processor.consumer.feeds import FeedPlan
from processor.consumer.forwarder import Forwarder
from processor.consumer.heartbeat import Heartbeat
from processor.consumer.membership import Membership
from processor.consumer.ownership import (
    FedStrategy,
    PartitionedStrategy,
    RaceStrategy,
    handover_grace_s,
    make_strategy,
)
from processor.consumer.spread import Spread
from processor.consumer.subscriber import Gap
from processor.consumer.subscribers import Subscribers
from processor.consumer.threads import OnFailure
from processor.consumer.write_thread import Batch, WriteThread
from processor.consumer.writer import Writer, WriteResult
from processor.handlers import FailureLog, Runner, load_handler, make_runner
from processor.observe.logs import Tagged
from processor.observe.metrics import ConsumerMetrics
from processor.store.connection import command_client
from processor.store.keys import Keys
from processor.store.outage import Backoff, Outage, Retrier

DEFAULT_HANDLER = "processor.handlers:add_random_score"


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the parts call back into the consumer, each from its own thread."""

    route: Callable[[list[bytes]], None]  # the subscriber, for every socket read
    failed: OnFailure  # any thread's unexpected death
    take_over: Callable[[list[bytes]], None]  # the heartbeat: messages others may have missed
    fenced: Callable[[], None]  # the heartbeat: the group declared us dead
    status: Callable[[], Mapping[str, str | int | float]]  # the heartbeat, before each beat
    report: Callable[[], None]  # the heartbeat: the supervisor's stats
    held: Callable[[], int]  # the writer, for what a give-up at shutdown loses
    written: Callable[[Batch, WriteResult | None, float], None]  # the write thread
    handler_load: Callable[[], float]  # the heartbeat: how much of our time the handler takes
    # The heartbeat, as a reader starts spreading: the inbox keeps what a function returns.
    keep: Callable[[Callable[[list[bytes]], list[bytes]]], int]


@dataclass(frozen=True, slots=True)
class Parts:
    metrics: ConsumerMetrics
    runner: Runner
    failures: FailureLog
    client: redis.Redis
    seen: SeenCheck
    membership: Membership
    strategy: RaceStrategy | PartitionedStrategy
    # A reader's subscriptions, or a fed consumer's feed from a reader.
    subscriber: Subscribers | Feed
    # A reader's outlets to the consumers it feeds (None for a fed consumer, or with race).
    forwarder: Forwarder | None
    heartbeat: Heartbeat
    writes: WriteThread
    registration: Retrier

    @property
    def role(self) -> str:
        """A reader subscribes (and may feed others); a fed consumer is fed by a reader."""
        return "fed" if isinstance(self.strategy, FedStrategy) else "reader"

    def start_reading(self) -> None:
        self.subscriber.start()
        if self.forwarder is not None:
            self.forwarder.start()

    def stop_reading(self) -> None:
        """Stops the subscriptions (which deliver what Redis sent before) and the feeds."""
        self.subscriber.stop()
        if self.forwarder is not None:
            self.forwarder.stop()


def assemble(
    settings: Settings,
    keys: Keys,
    stop: threading.Event,
    flushed: threading.Event,
    tagged: Tagged,
    hooks: Hooks,
    slot: int = 0,
    plan: FeedPlan | None = None,
) -> Parts:
    """With ``plan`` (a supervised group, partitioned) the slot is a reader or a fed consumer;
    without, it subscribes (as every consumer does with race)."""
    fed = plan is not None and settings.strategy != "race" and not plan.is_reader(slot)
    metrics = ConsumerMetrics(enabled=settings.metrics_port > 0, role="fed" if fed else "reader")
    on_recovered = metrics.reconnected if metrics.enabled else None
    handler = load_handler(settings.handler)
    # The built-in handler cannot hang: skip the two timer syscalls per message.
    timeout_s = 0.0 if settings.handler == DEFAULT_HANDLER else settings.handler_timeout_s
    runner = make_runner(handler, timeout_s, settings.handler_concurrency)
    failures = FailureLog(settings.monitor_interval_s, tagged)
    client = command_client(settings, name="processor-consumer")
    seen = SeenCheck(client, keys, Window.for_ttl(settings.dedup_window_ms))
    heartbeat_client = command_client(settings, name="processor-heartbeat")
    # On a cluster the heartbeat thread also talks to every partition's primary (fences,
    # backlog checks): with a quarter of the TTL at most, so one node failing over cannot
    # stall the beats past the TTL.
    side_client = heartbeat_client
    if keys.cluster:
        side_timeout_s = settings.heartbeat_ttl_ms / 4000
        side_client = command_client(
            settings, name="processor-heartbeat-side", timeout_s=side_timeout_s, retries=0
        )
    membership = Membership(
        heartbeat_client,
        keys,
        settings.heartbeat_ttl_ms,
        fence_ttl_ms=settings.takeover_buffer_ms,
        side_client=side_client,
    )
    strategy = (
        FedStrategy()
        if fed
        else make_strategy(
            settings.strategy,
            settings.takeover_buffer_ms / 1000,
            settings.takeover_buffer_max,
            # Half the dedup window, as for a rejoin after a stall: a takeover of what is older
            # could write again what its owner wrote before the window forgot it.
            settings.dedup_window_ms / 2000,
            grace_s=handover_grace_s(settings.heartbeat_interval_ms),
        )
    )
    gaps: queue.SimpleQueue[Gap] = queue.SimpleQueue()  # read by the heartbeat only
    subscriber: Subscribers | Feed
    forwarder: Forwarder | None = None
    if fed:
        assert plan is not None
        subscriber = Feed(
            plan.addresses_for(slot),
            deliver=hooks.route,
            on_gap=gaps.put,
            tagged=tagged,
            # Half the heartbeat's TTL: a stalled reader's consumers move before it is fenced.
            stall_s=settings.heartbeat_ttl_ms / 2000,
            on_failure=hooks.failed,
        )
    else:
        subscriber = Subscribers(
            settings,
            keys,
            deliver=hooks.route,
            on_gap=gaps.put,
            tagged=tagged,
            backoff_max_s=settings.reconnect_backoff_max_s,
            on_failure=hooks.failed,
            on_recovered=on_recovered,
        )
        if plan is not None and isinstance(strategy, PartitionedStrategy):
            forwarder = Forwarder(
                plan.address(slot),
                strategy,
                subscriber,
                tagged,
                on_failure=hooks.failed,
                # As many as the takeover buffer holds: past it, copies are gone anyway.
                max_queued=settings.takeover_buffer_max,
            )
    heartbeat = Heartbeat(
        heartbeat_client,
        keys,
        membership,
        strategy,
        interval_s=settings.heartbeat_interval_ms / 1000,
        backlog_warn_bytes=settings.backlog_warn_bytes,
        stop=stop,
        done=flushed,
        tagged=tagged,
        subscriptions=subscriber.connections,
        on_takeover=hooks.take_over,
        on_fenced=hooks.fenced,
        on_failure=hooks.failed,
        status=hooks.status,
        report=hooks.report,
        gaps=gaps,
        side_client=side_client,
        on_recovered=on_recovered,
        retain_margin_s=settings.detection_ms / 1000,
        spread=None
        if forwarder is None or not isinstance(strategy, PartitionedStrategy)
        else Spread(
            strategy,
            settings.spread,
            settings.spread_hold_ms / 1000,
            hooks.handler_load,
            # What we kept of theirs and have not handled yet is theirs to handle too.
            send_backlog=lambda: hooks.keep(
                lambda chunk: strategy.send_to_fed(chunk, time.monotonic())
            ),
            tagged=tagged,
        ),
    )
    writer = Writer(
        client,
        keys,
        settings.dedup_window_ms,
        settings.reconnect_backoff_max_s,
        tagged,
        stop=stop,
        grace_s=settings.shutdown_grace_s * 0.5,
        maxlen=settings.output_maxlen,
        wait_replicas=settings.wait_replicas,
        holding=hooks.held,
        strict_wait=settings.wait_replicas_mode == "strict",
        on_recovered=on_recovered,
    )
    writes = WriteThread(
        writer,
        identity=lambda: (membership.consumer_id, membership.token),
        on_done=hooks.written,
        on_failure=hooks.failed,
    )
    registration = Retrier(
        Outage("Redis (registration)", tagged, on_recovered=on_recovered),
        Backoff(0.1, settings.reconnect_backoff_max_s),
        stop,
    )
    return Parts(
        metrics,
        runner,
        failures,
        client,
        seen,
        membership,
        strategy,
        subscriber,
        forwarder,
        heartbeat,
        writes,
        registration,
    )
