"""The Pub/Sub reader against a real redis-server: order, reconnects with gaps, stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from demo.redis_server import RedisServer
from processor.config import Settings
from processor.consumer.backlog import pubsub_limits, server_backlog_bytes, warn_if_cut_off_unwarned
from processor.consumer.subscriber import Gap, Subscriber, now_ms
from tests.helpers import tagged, wait_until

CHANNEL = "messages:published"


class Received:
    """What a subscriber delivered, and the gaps it reported (called from its thread)."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.chunks = 0
        self.gaps: list[Gap] = []
        self._lock = threading.Lock()

    def deliver(self, chunk: list[bytes]) -> None:
        with self._lock:
            self.payloads.extend(chunk)
            self.chunks += 1

    def count(self) -> int:
        with self._lock:
            return len(self.payloads)


StartSubscriber = Callable[[str], tuple[Subscriber, Received]]


@pytest.fixture
def redis_url(private_redis: RedisServer) -> str:
    """Each test's own server (the suite's shared one overridden here): these tests count a
    message's receivers, and a subscriber another test left on a shared server counts too."""
    return private_redis.url


@pytest.fixture
def start_subscriber() -> Iterator[StartSubscriber]:
    started: list[Subscriber] = []
    failures: list[tuple[str, BaseException]] = []

    def start(url: str) -> tuple[Subscriber, Received]:
        received = Received()
        subscriber = Subscriber(
            Settings(redis_url=url),
            [CHANNEL],
            deliver=received.deliver,
            on_gap=received.gaps.append,
            tagged=tagged("[t]"),
            backoff_max_s=0.2,
            on_failure=lambda name, error: failures.append((name, error)),
        )
        started.append(subscriber)
        subscriber.start()
        return subscriber, received

    yield start
    for subscriber in started:
        subscriber.stop()
    for subscriber in started:
        subscriber.join(timeout=10)
    assert not failures, f"a subscriber thread died: {failures}"


def _publish(client: redis.Redis, payloads: list[bytes]) -> list[int]:
    receivers: list[int] = []
    for start in range(0, len(payloads), 1000):
        with client.pipeline(transaction=False) as pipe:
            for payload in payloads[start : start + 1000]:
                pipe.publish(CHANNEL, payload)
            receivers.extend(pipe.execute())
    return receivers


def _payloads(start: int, stop: int) -> list[bytes]:
    return [b'{"message_id":"m-%d"}' % index for index in range(start, stop)]


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def test_every_message_arrives_in_order(
    start_subscriber: StartSubscriber, redis_url: str, r: redis.Redis
) -> None:
    subscriber, received = start_subscriber(redis_url)
    assert subscriber.subscribed.wait(10)
    payloads = _payloads(0, 10_000)
    client = _client(redis_url)
    try:
        assert _publish(client, payloads) == [1] * len(payloads)
    finally:
        client.close()
    wait_until(lambda: received.count() >= len(payloads), timeout=20)
    assert received.payloads == payloads
    assert subscriber.received == len(payloads)
    assert received.chunks < len(payloads)  # handed over per socket read, not per message
    assert received.gaps == []


def test_resubscribes_after_the_connection_is_killed_and_reports_the_gap(
    start_subscriber: StartSubscriber, redis_url: str, r: redis.Redis
) -> None:
    subscriber, received = start_subscriber(redis_url)
    assert subscriber.subscribed.wait(10)
    first_client_id = subscriber.client_id

    assert r.client_kill_filter(_type="pubsub") == 1

    wait_until(lambda: received.gaps and subscriber.subscribed.is_set(), timeout=10)
    (gap,) = received.gaps
    assert gap.end_ms >= gap.start_ms
    assert subscriber.gaps == 1
    assert subscriber.client_id != first_client_id
    assert r.pubsub_numsub(CHANNEL) == [(CHANNEL, 1)]
    client = _client(redis_url)
    try:
        assert _publish(client, _payloads(0, 100)) == [1] * 100
    finally:
        client.close()
    wait_until(lambda: received.count() >= 100, timeout=10)
    assert received.payloads == _payloads(0, 100)


def test_stop_delivers_what_was_published_before_it_and_ends_the_thread(
    start_subscriber: StartSubscriber, redis_url: str, r: redis.Redis
) -> None:
    subscriber, received = start_subscriber(redis_url)
    assert subscriber.subscribed.wait(10)
    payloads = _payloads(0, 5_000)
    client = _client(redis_url)
    try:
        assert _publish(client, payloads) == [1] * len(payloads)
    finally:
        client.close()
    subscriber.stop()
    subscriber.join(timeout=10)
    assert not subscriber.is_alive()
    assert received.payloads == payloads  # everything Redis had sent before the UNSUBSCRIBE
    assert not subscriber.subscribed.is_set()
    wait_until(lambda: r.pubsub_numsub(CHANNEL) == [(CHANNEL, 0)], timeout=5)


def test_reset_resubscribes_without_a_gap(
    start_subscriber: StartSubscriber, redis_url: str, r: redis.Redis
) -> None:
    subscriber, received = start_subscriber(redis_url)
    assert subscriber.subscribed.wait(10)
    first_client_id = subscriber.client_id
    subscriber.reset()
    wait_until(
        lambda: subscriber.subscribed.is_set() and subscriber.client_id != first_client_id,
        timeout=10,
    )
    assert received.gaps == []
    assert subscriber.gaps == 0


def test_survives_a_redis_restart_and_reports_the_gap(
    start_subscriber: StartSubscriber, private_redis: RedisServer
) -> None:
    subscriber, received = start_subscriber(private_redis.url)
    assert subscriber.subscribed.wait(10)
    private_redis.stop()  # comes back on the same port
    wait_until(lambda: not subscriber.subscribed.is_set(), timeout=10)
    private_redis.start()
    wait_until(lambda: received.gaps and subscriber.subscribed.is_set(), timeout=15)
    (gap,) = received.gaps
    assert gap.end_ms >= gap.start_ms
    client = _client(private_redis.url)
    try:
        assert _publish(client, _payloads(0, 10)) == [1] * 10
    finally:
        client.close()
    wait_until(lambda: received.count() >= 10, timeout=10)
    assert received.payloads == _payloads(0, 10)


def test_waits_for_redis_that_is_not_up_yet(
    start_subscriber: StartSubscriber, private_redis: RedisServer
) -> None:
    private_redis.stop()
    subscriber, received = start_subscriber(private_redis.url)
    assert not subscriber.subscribed.wait(0.3)
    private_redis.start()
    assert subscriber.subscribed.wait(15)
    assert received.gaps == []  # never subscribed before: nothing was missed


def test_server_backlog_of_a_subscriber_that_does_not_read_is_measured(
    redis_url: str, r: redis.Redis
) -> None:
    lazy = redis.Redis.from_url(redis_url).pubsub()
    lazy.subscribe("backlog")
    lazy.get_message(timeout=1.0)  # the subscribe confirmation; then we stop reading
    try:
        clients = r.client_list(_type="pubsub")
        lazy_id = int(clients[0]["id"])
        assert server_backlog_bytes(r, lazy_id) == 0
        payload = b"x" * 1_000_000
        for _ in range(20):
            r.publish("backlog", payload)
        # 20 MB published: more than the socket buffers hold, less than the 32 MB hard limit.
        wait_until(
            lambda: server_backlog_bytes(r, lazy_id) > 1_000_000,
            5.0,
            message="omem never grew for a subscriber that does not read",
        )
    finally:
        lazy.close()


def test_an_unexpected_error_in_the_reader_is_reported_not_swallowed(
    redis_url: str, r: redis.Redis
) -> None:
    failures: list[tuple[str, BaseException]] = []

    def deliver(chunk: list[bytes]) -> None:
        raise ValueError("routing bug")

    subscriber = Subscriber(
        Settings(redis_url=redis_url),
        [CHANNEL],
        deliver=deliver,
        on_gap=lambda gap: None,
        tagged=tagged("[t]"),
        backoff_max_s=0.2,
        on_failure=lambda name, error: failures.append((name, error)),
    )
    subscriber.start()
    wait_until(subscriber.subscribed.is_set, 10)
    assert r.publish(CHANNEL, b"x") == 1
    subscriber.join(timeout=10)
    assert not subscriber.is_alive()
    assert [(name, str(error)) for name, error in failures] == [("subscriber", "routing bug")]


def test_a_subscriber_cut_off_for_its_backlog_reports_a_gap_that_holds_what_it_lost(
    private_redis: RedisServer,
) -> None:
    """Redis closes a subscriber whose output buffer passes its limit and drops what it held,
    published before the bytes still unread in our socket. The gap must begin before those
    messages, not at the last byte read, or the messages Pub/Sub lost fall outside every
    reported gap."""
    admin = _client(private_redis.url)
    admin.config_set("client-output-buffer-limit", "pubsub 256kb 128kb 1")
    stalled, release = threading.Event(), threading.Event()
    delivered: list[bytes] = []
    gaps: list[Gap] = []
    failures: list[tuple[str, BaseException]] = []

    def deliver(chunk: list[bytes]) -> None:
        delivered.extend(chunk)
        if not release.is_set():  # a consumer stuck behind a slow handler
            stalled.set()
            release.wait(60)

    subscriber = Subscriber(
        Settings(redis_url=private_redis.url),
        [CHANNEL],
        deliver=deliver,
        on_gap=gaps.append,
        tagged=tagged("[t]"),
        backoff_max_s=0.2,
        on_failure=lambda name, error: failures.append((name, error)),
    )
    subscriber.start()
    try:
        assert subscriber.subscribed.wait(10)
        assert admin.publish(CHANNEL, b"first") == 1
        assert stalled.wait(10)
        published_at: dict[bytes, int] = {}
        padding = b"x" * 1000
        for batch in range(200):  # up to 200,000 messages of 1 kB, until Redis cuts it off
            payloads = [b"%d-%d-%s" % (batch, n, padding) for n in range(1000)]
            started_ms = now_ms()
            with admin.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.publish(CHANNEL, payload)
                receivers = pipe.execute()
            published_at.update(
                (payload, started_ms)
                for payload, count in zip(payloads, receivers, strict=True)
                if count
            )
            if admin.pubsub_numsub(CHANNEL) == [(CHANNEL.encode(), 0)]:
                break
        else:
            pytest.fail("Redis never cut the subscriber off")
        release.set()
        wait_until(lambda: gaps and subscriber.subscribed.is_set(), timeout=15)
    finally:
        release.set()
        subscriber.stop()
        subscriber.join(timeout=10)
        admin.close()
    assert not failures, failures
    lost = set(published_at) - set(delivered)
    assert lost, "Redis dropped nothing: not the case under test"
    (gap,) = gaps
    earliest = min(published_at[payload] for payload in lost)
    assert gap.start_ms <= earliest <= gap.end_ms, (gap, earliest, len(lost))


def test_a_pubsub_output_limit_below_the_backlog_warning_is_warned_at_start(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With the limit at or below BACKLOG_WARN_BYTES a reader is cut off before the heartbeat
    warns that it falls behind: said once, at start."""
    admin = _client(private_redis.url)
    try:
        assert pubsub_limits(admin) == (32 * 2**20, 8 * 2**20, 60)  # Redis's default
        warn_if_cut_off_unwarned(admin, warn_bytes=4 * 2**20)
        assert "client-output-buffer-limit" not in caplog.text
        admin.config_set("client-output-buffer-limit", "pubsub 64kb 0 0")
        warn_if_cut_off_unwarned(admin, warn_bytes=4 * 2**20)
    finally:
        admin.close()
    assert (
        "Redis cuts a subscriber off at client-output-buffer-limit pubsub 64 KiB (hard), none "
        "for 0 s (soft): at or below BACKLOG_WARN_BYTES (4 MiB)"
    ) in caplog.text


def test_a_quiet_subscription_answering_its_pings_stays_up_and_a_silent_one_is_dropped(
    private_redis: RedisServer,
) -> None:
    """Each answered PING counts as a sign of life (and moves the start of a future gap); a
    server that stops answering is dropped after twice the health-check time."""
    gaps: list[Gap] = []
    failures: list[tuple[str, BaseException]] = []
    subscriber = Subscriber(
        Settings(redis_url=private_redis.url),
        [CHANNEL],
        deliver=lambda chunk: None,
        on_gap=gaps.append,
        tagged=tagged("[t]"),
        backoff_max_s=0.2,
        on_failure=lambda name, error: failures.append((name, error)),
        health_check_s=0.3,
    )
    subscriber.start()
    try:
        assert subscriber.subscribed.wait(10)
        first = subscriber.client_id
        # Quiet for five times the silence allowed (the scenario, not a wait for an event):
        # only the PINGs' replies come in.
        time.sleep(3.0)
        assert (subscriber.gaps, subscriber.subscriptions, subscriber.client_id) == (0, 1, first)
        # Redis stops answering (SIGSTOP): the subscription is dropped, then taken up again.
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: not subscriber.subscribed.is_set(), 10, message="never dropped")
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        wait_until(lambda: gaps and subscriber.subscribed.is_set(), 15, message="no gap")
    finally:
        subscriber.stop()
        subscriber.join(timeout=10)
    assert not failures, failures
