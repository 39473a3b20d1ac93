"""The consumer's internals, one piece at a time, against the suite's redis-server.

``make_consumer`` builds a Consumer with fast settings and its threads' objects in place
(``_set_up``); ``joined=True`` also subscribes and registers it. Each is stopped in teardown.
The process-level tests (test_e2e, test_faults, test_thread_failures) run the same code whole.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from processor.config import Settings
from processor.consumer.consumer import Consumer
from processor.consumer.fence import Fence
from processor.consumer.inbox import Inbox
from processor.consumer.messages import OUTPUT, Entry
from processor.consumer.stats import ADDED, ConsumerStats
from processor.consumer.write_thread import Batch
from processor.consumer.writer import WriteResult
from processor.store.keys import Keys
from tests.helpers import logged, wait_until

pytestmark = pytest.mark.timeout(60)

MakeConsumer = Callable[..., Consumer]


@pytest.fixture
def make_consumer(redis_url: str) -> Iterator[MakeConsumer]:
    made: list[Consumer] = []

    def make(joined: bool = False, slot: int = 0, **overrides: Any) -> Consumer:
        settings = Settings(
            redis_url=redis_url,
            heartbeat_interval_ms=100,
            heartbeat_ttl_ms=1000,
            reconnect_backoff_max_s=0.2,
            shutdown_grace_s=2.0,
            **overrides,
        )
        stats = ConsumerStats(multiprocessing.get_context("spawn"))
        consumer = Consumer(settings, slot, stats)
        consumer._set_up()
        made.append(consumer)
        if joined:
            consumer._join()
        return consumer

    yield make
    for consumer in made:
        consumer.stop.set()
        consumer._tear_down()


def entries(count: int, start: int = 0) -> list[Entry]:
    return [Entry(OUTPUT, f"m-{n}", f'{{"n": {n}}}') for n in range(start, start + count)]


def in_writer_thread(call: Callable[[], None]) -> None:
    """Runs ``call`` on another thread, as the write thread makes its callbacks."""
    thread = threading.Thread(target=call)
    thread.start()
    thread.join(10)


# -- held and left accounting -------------------------------------------------------------


def test_held_counts_the_inbox_and_the_batch_in_hand_not_the_queued_takeovers(
    make_consumer: MakeConsumer,
) -> None:
    """Queued takeovers are copies of others' messages (their owner wrote them, or the live
    consumers' buffers hold them): not ours to count as held, or lost at a stop."""
    consumer = make_consumer()
    assert consumer._held() == 0
    consumer._inbox.put([b"a", b"b", b"c"])
    consumer._in_hand = 2
    consumer._takeovers.append([b"x", b"y"])
    assert consumer._held() == 3 + 2


def test_what_is_held_at_exit_with_no_live_consumer_left_is_counted_lost(
    make_consumer: MakeConsumer, r: redis.Redis
) -> None:
    consumer = make_consumer()
    consumer._inbox.put([b"a", b"b", b"c"])
    consumer._count_unwritten()
    totals = consumer._totals.snapshot()
    assert (totals.lost, totals.left_to_takeover) == (3, 0)
    stats = Keys.from_settings(consumer.settings).stats
    assert r.hget(stats, "lost") == "3"


def test_what_a_failed_consumer_holds_is_left_to_the_live_consumers_takeover(
    make_consumer: MakeConsumer, r: redis.Redis
) -> None:
    consumer = make_consumer(joined=True, slot=0)
    make_consumer(joined=True, slot=1)
    wait_until(lambda: len(consumer._heartbeat.members) == 2, 10, message="no second member")
    consumer._failure = "writer thread failed: RuntimeError: injected"
    consumer._inbox.put([b"a", b"b"])
    consumer._count_unwritten()
    totals = consumer._totals.snapshot()
    assert (totals.lost, totals.left_to_takeover) == (0, 2)
    assert r.hget(Keys.from_settings(consumer.settings).stats, "left_to_takeover") == "2"


# -- the fenced hand-off ------------------------------------------------------------------


def test_a_batch_the_fence_refused_reaches_the_loop_only_when_it_takes_the_reports(
    make_consumer: MakeConsumer,
) -> None:
    consumer = make_consumer()
    refused = entries(4)
    batch = Batch(refused, None)
    in_writer_thread(lambda: consumer._written(batch, WriteResult(0, 0, 0, fenced=True), 0.0))
    # The write thread changed nothing of the loop's: the report waits for the loop.
    assert consumer._fence.unwritten == [] and not consumer._fence.fenced
    assert consumer._fence.take_reports()
    assert consumer._fence.unwritten == refused
    assert not consumer._fence.take_reports()  # taken once
    consumer._count_unwritten()
    assert consumer._totals.snapshot().lost == 4  # fenced, and no one else to take them over


def test_the_heartbeat_reports_a_declared_death_once_and_the_loop_rejoins_under_a_new_id(
    make_consumer: MakeConsumer, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = make_consumer(joined=True)
    old_id = consumer._membership.consumer_id
    keys = Keys.from_settings(consumer.settings)
    caplog.set_level(logging.WARNING, logger="processor.consumer.heartbeat")
    # Declared dead: the heartbeat key deleted before its TTL (as by a FLUSHALL) and the group
    # dropped us from its list.
    r.delete(keys.heartbeat(old_id))
    r.lrem(keys.consumers, 0, old_id)
    wait_until(lambda: "declared us dead" in caplog.text, 10, message="heartbeat did not see it")
    assert not consumer._fence.fenced  # the heartbeat only reports; the loop owns the state
    consumer._step()
    new_id = consumer._membership.consumer_id
    assert new_id != old_id and not consumer._fence.fenced
    stats = consumer.stats
    assert stats is not None
    wait_until(lambda: stats.consumer_id == new_id, 10, message="new id not reported")
    dead_lines = [logged(rec) for rec in caplog.records if "declared us dead" in logged(rec)]
    (dead_line,) = dead_lines
    assert dead_line.startswith(
        f"[{old_id} pid={os.getpid()}] the group declared us dead: our heartbeat key was gone "
    ), dead_line
    assert "before its TTL; Redis lost the group's keys (FLUSHALL" in dead_line, dead_line
    # The rejoin is the consumer's line, under its module's name wherever its code lives.
    rejoined = [rec for rec in caplog.records if "rejoined after a stall" in logged(rec)]
    assert [rec.name for rec in rejoined] == ["processor.consumer.consumer"]


# -- the counters ---------------------------------------------------------------------------


def test_the_counters_snapshot_sums_what_each_thread_counted(
    make_consumer: MakeConsumer,
) -> None:
    consumer = make_consumer(joined=True)
    result = WriteResult(5, 2, 3, unconfirmed=1)
    in_writer_thread(lambda: consumer._written(Batch(entries(10), None), result, 0.0))
    in_writer_thread(lambda: consumer._written(Batch(entries(6), None), None, 0.0))
    # Counted by the loop as taken over; written by the write thread as two dead letters.
    consumer._take_over([b"not json", b"[]"])
    consumer._writes.wait_idle()
    consumer._inbox.put([b"a"])
    consumer._count_unwritten()
    totals = consumer._totals.snapshot()
    assert (totals.written, totals.dead, totals.skipped, totals.unconfirmed) == (5, 4, 3, 1)
    assert totals.taken_over == 2
    assert totals.lost == 6 + 1  # the batch a stop gave up, and what was held at exit
    status = consumer._reporting.status()
    assert (status["written"], status["dead"], status["taken_over"]) == (5, 4, 2)


def test_the_heartbeat_alone_writes_the_slot_stats_adding_to_the_slots_earlier_sums(
    make_consumer: MakeConsumer,
) -> None:
    consumer = make_consumer()
    stats = consumer.stats
    assert stats is not None
    stats.set(written=100, dead=10)  # counted by the consumers the slot had before
    consumer._reporting.stats_base = {name: stats.get(name) for name in ADDED}
    before = stats.snapshot()
    in_writer_thread(lambda: consumer._written(Batch(entries(8), None), WriteResult(7, 1, 0), 0.0))
    consumer._take_over([])  # the loop's count
    assert stats.snapshot() == before  # neither the write thread nor the loop wrote them
    consumer._reporting.report_stats()  # what the heartbeat thread does before each beat
    assert (stats.get("written"), stats.get("dead")) == (107, 11)


def test_the_heartbeat_reports_what_is_held_while_the_loop_waits_for_a_handler(
    make_consumer: MakeConsumer, redis_url: str, r: redis.Redis
) -> None:
    consumer = make_consumer(joined=True)
    stats = consumer.stats
    assert stats is not None
    wait_until(lambda: stats.consumer_id == consumer._membership.consumer_id, 10)
    # The loop is not stepping (as while a handler hangs): the beats still report.
    consumer._inbox.put([b"a", b"b", b"c"])
    wait_until(lambda: stats.get("held") == 3, 10, message="held not reported")
    assert stats.get("ready") == 1


# -- the identity in the log ----------------------------------------------------------------


def test_the_consumers_lines_start_with_its_identity_and_keep_their_modules_name(
    make_consumer: MakeConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    consumer = make_consumer()
    consumer._log.info("before joining")
    consumer._join()
    consumer_id = consumer._membership.consumer_id
    pid = os.getpid()
    assert f"[joining pid={pid}] before joining" in map(logged, caplog.records)
    # In a JSON line the same identity is in fields: no id yet while joining.
    (joining,) = [rec for rec in caplog.records if rec.getMessage() == "before joining"]
    assert (joining.__dict__["consumer_id"], joining.__dict__["slot"]) == (None, consumer.slot)
    ready = [rec for rec in caplog.records if "consumer ready" in logged(rec)]
    assert ready and ready[0].name == "processor.consumer.consumer"
    assert logged(ready[0]).startswith(f"[{consumer_id} pid={pid}] consumer ready: ")
    assert ready[0].__dict__["consumer_id"] == consumer_id
    changed = [rec for rec in caplog.records if "group changed" in logged(rec)]
    assert changed and changed[0].name == "processor.consumer.heartbeat"
    assert logged(changed[0]) == f"[{consumer_id} pid={pid}] group changed: 1 live consumers"


def test_what_the_fence_refused_is_held_until_written_again() -> None:
    """A consumer killed with refused batches (declared dead, then SHUTDOWN_GRACE) must count
    them as held: the supervisor records what a killed consumer held as lost."""
    fence = Fence(None, Inbox(), deque(), threading.Event(), 60_000, lambda: True, None, None)  # type: ignore[arg-type]
    fence.report([])  # the heartbeat's report: nothing refused
    fence.report(entries(3))
    assert fence.holding() == 3  # reported, not taken yet
    assert fence.take_reports()
    assert fence.holding() == 3  # taken, not written yet
    fence.unwritten = []  # as a rejoin hands them back to the writer
    assert fence.holding() == 0


def test_a_subscribed_consumer_whose_beats_fail_reports_itself_not_ready_past_the_ttl(
    make_consumer: MakeConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its reports go on without Redis, but once its last live beat is older than
    HEARTBEAT_TTL_MS the group may have declared it dead: receiving, not registered."""
    consumer = make_consumer(joined=True)
    stats = consumer.stats
    wait_until(lambda: stats.get("ready") == 1, 5, message="never ready")

    def refused(status: object = None) -> None:
        raise redis.ConnectionError("beats refused by the test")

    monkeypatch.setattr(consumer._membership, "beat", refused)
    wait_until(lambda: stats.get("ready") == 0, 3, message="still ready without a beat")
    assert stats.get("receiving") == 1
    assert stats.age_s() < consumer.settings.heartbeat_ttl_ms / 1000
