"""WAIT_REPLICAS against a real primary and replica: the replica paused (SIGSTOP) cannot confirm
writes, so WAIT falls short until it is resumed (SIGCONT)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from demo.redis_server import RedisServer, free_port
from processor.config import Settings
from processor.consumer.messages import OUTPUT, Entry
from processor.consumer.writer import Writer, WriteResult
from processor.store.connection import command_client
from processor.store.keys import Keys
from processor.store.outage import Downtime
from tests.faults_support import CHANNEL, start_daemon
from tests.helpers import logged, tagged, wait_until
from tests.test_metrics import scrape

CONSUMER = "test-consumer-1"
WAIT_TIMEOUT_MS = 100  # short: a held batch WAITs many times within a test


class Replicated:
    """A primary with one replica in sync."""

    def __init__(self, primary: RedisServer, replica: RedisServer) -> None:
        self.primary = primary
        self.replica = replica

    def pause_replica(self) -> None:
        os.kill(self.replica.pid, signal.SIGSTOP)

    def resume_replica(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.replica.pid, signal.SIGCONT)

    def calls(self, command: str) -> int:
        """How many times the primary ran ``command`` (INFO commandstats)."""
        client = self.primary.client(timeout_s=5)
        try:
            stats = client.info("commandstats").get(f"cmdstat_{command}", {})
            return int(stats.get("calls", 0))
        finally:
            client.close()


@pytest.fixture
def replicated() -> Iterator[Replicated]:
    # No waiting for more replicas before the first sync.
    primary_config = {"repl-diskless-sync-delay": "0"}
    with RedisServer(extra_config=primary_config) as primary, RedisServer() as replica:
        pair = Replicated(primary, replica)
        admin = replica.client(timeout_s=5)
        watch = primary.client(timeout_s=5)
        try:
            admin.replicaof("127.0.0.1", primary.port)
            # Online once the primary has its first acknowledgement: only then can it confirm.
            wait_until(
                lambda: watch.info("replication").get("slave0", {}).get("state") == "online",
                20,
                message="the replica never synced",
            )
            yield pair
        finally:
            # A stopped process ignores SIGTERM until resumed: let the fixture stop it.
            pair.resume_replica()
            admin.close()
            watch.close()


@pytest.fixture
def settings(replicated: Replicated) -> Settings:
    return Settings(redis_url=replicated.primary.url, dedup_window_ms=60_000)


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys.from_settings(settings)


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    client = command_client(settings, name="test-writer")
    try:
        yield client
    finally:
        client.close()


def _writer(
    client: redis.Redis,
    keys: Keys,
    strict: bool,
    stop: threading.Event,
    wait_timeout_ms: int = WAIT_TIMEOUT_MS,
) -> Writer:
    return Writer(
        client,
        keys,
        60_000,
        0.2,
        tagged("[t]"),
        stop,
        0.5,
        wait_replicas=1,
        strict_wait=strict,
        wait_timeout_ms=wait_timeout_ms,
    )


def _entries(start: int, stop: int) -> list[Entry]:
    return [
        Entry(OUTPUT, f"m-{index}", json.dumps({"message_id": f"m-{index}"}))
        for index in range(start, stop)
    ]


def _ids(server: RedisServer, stream: str) -> list[str]:
    client = server.client(timeout_s=5)
    try:
        return [fields[b"message_id"].decode() for _, fields in client.xrange(stream)]
    finally:
        client.close()


class _Background:
    """One write on a thread of its own, to watch it while it is held."""

    def __init__(self, writer: Writer, entries: list[Entry]) -> None:
        self.results: list[WriteResult | None] = []
        self._thread = threading.Thread(
            target=lambda: self.results.append(writer.write(entries, CONSUMER, "")), daemon=True
        )
        self._thread.start()

    def returned(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float) -> WriteResult | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the write never returned"
        return self.results[0]


def _logged(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [logged(record) for record in caplog.records if fragment in logged(record)]


def test_strict_holds_a_batch_until_a_replica_confirms_it(
    replicated: Replicated,
    client: redis.Redis,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The process's own Downtime is shared with every Outage of the tests run before in this
    # worker (one left on would keep it growing): this test reads one of its own.
    downtime = Downtime()
    monkeypatch.setattr("processor.consumer.writer.DOWNTIME", downtime)
    writer = _writer(client, keys, strict=True, stop=threading.Event())
    caplog.set_level("WARNING", logger="processor.consumer.writer")
    replicated.pause_replica()
    waits_before = replicated.calls("wait")
    downtime_before = downtime.total_s(time.monotonic())
    write = _Background(writer, _entries(0, 10))
    wait_until(lambda: _logged(caplog, "holding 10 messages"), 10, message="never held")
    # Written on the primary at once; WAIT retried there again and again while held.
    assert _ids(replicated.primary, keys.output) == [f"m-{index}" for index in range(10)]
    wait_until(lambda: replicated.calls("wait") >= waits_before + 4, 10, message="no re-WAIT")
    assert not write.returned()
    assert _logged(caplog, "holding 10 messages") == [
        "[t] holding 10 messages written to messages:processed: 0 of 1 replicas confirmed them "
        f"within {WAIT_TIMEOUT_MS} ms; waiting until they do (WAIT_REPLICAS_MODE=strict)"
    ]

    replicated.resume_replica()
    assert write.result(10) == WriteResult(10, 0, 0)
    assert _logged(caplog, "confirmed by 1 of 1 replicas")
    # Takeover buffers did not age while held: at least the three WAITs that ran out before a
    # fourth began (0.1, then 0.2 s each) count as downtime, and it ended with the hold.
    held_s = downtime.total_s(time.monotonic()) - downtime_before
    assert held_s >= 0.5
    assert downtime.total_s(time.monotonic()) - downtime_before == held_s
    assert _ids(replicated.replica, keys.output) == [f"m-{index}" for index in range(10)]
    # Nothing degraded: the next write waits for the replica again, and gets it.
    assert writer.write(_entries(10, 20), CONSUMER, "") == WriteResult(10, 0, 0)
    assert _ids(replicated.primary, keys.output) == [f"m-{index}" for index in range(20)]


def test_strict_reruns_the_script_after_the_held_connection_drops(
    replicated: Replicated, client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A WAIT confirms only its own connection's writes: after a drop the script runs again
    (skipping what it wrote) and its WAIT covers them; the counts are the first run's."""
    writer = _writer(client, keys, strict=True, stop=threading.Event())
    caplog.set_level("WARNING", logger="processor.consumer.writer")
    replicated.pause_replica()
    write = _Background(writer, _entries(0, 10))
    wait_until(lambda: _logged(caplog, "holding 10 messages"), 10, message="never held")
    scripts_before = replicated.calls("evalsha")
    admin = replicated.primary.client(timeout_s=5)
    try:
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        admin.close()
    wait_until(lambda: replicated.calls("evalsha") > scripts_before, 10, message="no re-run")
    assert not write.returned()

    replicated.resume_replica()
    assert write.result(10) == WriteResult(10, 0, 0)
    assert _ids(replicated.primary, keys.output) == [f"m-{index}" for index in range(10)]
    assert len(_logged(caplog, "holding 10 messages")) == 1


def test_strict_lets_a_held_batch_go_unconfirmed_when_the_stop_grace_is_over(
    replicated: Replicated, client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    stop = threading.Event()
    writer = _writer(client, keys, strict=True, stop=stop)
    caplog.set_level("WARNING", logger="processor.consumer.writer")
    replicated.pause_replica()
    write = _Background(writer, _entries(0, 10))
    wait_until(lambda: _logged(caplog, "holding 10 messages"), 10, message="never held")
    stop.set()
    assert write.result(10) == WriteResult(10, 0, 0, unconfirmed=10)
    [let_go] = _logged(caplog, "let go unconfirmed")
    assert "stopping: 10 held messages let go unconfirmed" in let_go
    assert "0 of 1 replicas confirmed them: they are written on the primary" in let_go
    # Past the grace, what is still to write goes without waiting (and is counted).
    assert writer.write(_entries(10, 15), CONSUMER, "") == WriteResult(5, 0, 0, unconfirmed=5)
    assert _ids(replicated.primary, keys.output) == [f"m-{index}" for index in range(15)]


def test_degrade_accepts_unconfirmed_writes_and_counts_them(
    replicated: Replicated, client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    # In sync: confirmed, with time for a loaded machine (100 ms was missed there).
    in_sync = _writer(client, keys, strict=False, stop=threading.Event(), wait_timeout_ms=5000)
    assert in_sync.write(_entries(0, 10), CONSUMER, "") == WriteResult(10, 0, 0)
    writer = _writer(client, keys, strict=False, stop=threading.Event())
    caplog.set_level("WARNING", logger="processor.consumer.writer")
    replicated.pause_replica()
    results = [writer.write(_entries(start, start + 10), CONSUMER, "") for start in (10, 20)]
    # The first fell short and was accepted; the second did not wait at all.
    assert results == [WriteResult(10, 0, 0, unconfirmed=10)] * 2
    assert _ids(replicated.primary, keys.output) == [f"m-{index}" for index in range(30)]
    assert _logged(caplog, "replicas confirmed a write") == [
        f"[t] 0 of 1 replicas confirmed a write to messages:processed within {WAIT_TIMEOUT_MS} "
        "ms: writing there without waiting for 5 s (a failover now could lose what they lack)"
    ]


# -- the daemon as a process -------------------------------------------------------------------


def _publish(url: str, start: int, stop: int) -> None:
    publisher = redis.Redis.from_url(url)
    try:
        for index in range(start, stop):
            payload = json.dumps({"message_id": f"m-{index}"})
            assert publisher.publish(CHANNEL, payload) == 1
    finally:
        publisher.close()


def test_the_daemon_in_strict_mode_holds_and_says_so_at_its_stop(
    procs: object, replicated: Replicated, tmp_path: Path
) -> None:
    url = replicated.primary.url
    daemon = start_daemon(
        procs, url, "partitioned", count=1, WAIT_REPLICAS=1, WAIT_REPLICAS_MODE="strict"
    )
    replicated.pause_replica()
    _publish(url, 0, 20)
    wait_until(lambda: "holding" in daemon.log(), 20, message="never held")
    # Held means written to the primary, not confirmed; a batch cut after it waits its turn.
    assert _ids(replicated.primary, "messages:processed")
    replicated.resume_replica()
    wait_until(lambda: "held messages written to" in daemon.log(), 20, message="not confirmed")
    assert "confirmed by 1 of 1 replicas" in daemon.log()
    wait_until(lambda: len(_ids(replicated.primary, "messages:processed")) == 20, 20)
    holds = daemon.log().count("] holding")
    replicated.pause_replica()
    _publish(url, 20, 30)
    wait_until(lambda: daemon.log().count("] holding") > holds, 20, message="never held again")
    daemon.stop("strict stop")
    log = daemon.log()
    assert "held messages let go unconfirmed" in log
    assert "lost=0 left_to_takeover=0 gaps=0 unconfirmed=10" in log
    assert _ids(replicated.primary, "messages:processed") == [f"m-{i}" for i in range(30)]


def test_the_daemon_in_degrade_mode_counts_unconfirmed_writes(
    procs: object, replicated: Replicated
) -> None:
    url = replicated.primary.url
    port = free_port()
    start_daemon(procs, url, "partitioned", count=1, WAIT_REPLICAS=1, METRICS_PORT=port)
    _publish(url, 0, 10)
    # The metrics count a batch once its WAIT returned, after its entries are in the stream.
    wait_until(lambda: scrape(port).get("processor_messages_written_total") == 10, 20)
    # In sync, normally 0; a loaded machine's replica can miss the daemon's short WAIT, and
    # those are counted too: the assertion below is about the 20 written while it is paused.
    in_sync = scrape(port).get("processor_messages_unconfirmed_total", 0)
    assert in_sync <= 10
    replicated.pause_replica()
    _publish(url, 10, 30)
    wait_until(lambda: len(_ids(replicated.primary, "messages:processed")) == 30, 20)
    wait_until(
        lambda: scrape(port).get("processor_messages_unconfirmed_total") == in_sync + 20,
        20,
        message=lambda: f"not counted: {scrape(port)}",
    )


def test_strict_rides_out_its_primary_demoted_while_it_waits(
    replicated: Replicated, client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A primary turned replica ends the WAITs blocked on it with an UNBLOCKED error: the held
    batch is retried like after a dropped connection, not dropped with the write thread."""
    writer = _writer(client, keys, strict=True, stop=threading.Event())
    caplog.set_level("WARNING")
    replicated.pause_replica()
    write = _Background(writer, _entries(0, 10))
    wait_until(lambda: _logged(caplog, "holding 10 messages"), 10, message="never held")
    admin = replicated.primary.client(timeout_s=5)
    try:
        admin.replicaof("127.0.0.1", free_port())  # a primary that is not there: no resync
        wait_until(lambda: _logged(caplog, "UNBLOCKED"), 10, message="WAIT not ended")
        wait_until(
            lambda: "errorstat_READONLY" in admin.info("errorstats"),
            10,
            message="not retried on the replica it became",
        )
        assert not write.returned()
        admin.replicaof("no", "one")
    finally:
        admin.close()
    replicated.resume_replica()
    assert write.result(20) == WriteResult(10, 0, 0)
    assert _ids(replicated.primary, keys.output) == [f"m-{index}" for index in range(10)]
