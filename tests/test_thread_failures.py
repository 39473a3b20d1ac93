"""A consumer whose thread dies of an unexpected error leaves the group at once; nothing is lost.

One consumer runs in this process, with a fault armed in one of its threads (reader, writer,
heartbeat, the loop that runs the handler); a second one runs as ``demo/consume.py``. The
heartbeat TTL is 20 s, so only an explicit leave explains how fast the survivor takes over.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from processor.config import Settings
from processor.consumer.consumer import Consumer
from processor.consumer.heartbeat import Heartbeat
from processor.consumer.writer import Writer
from processor.errors import ConsumerFailed
from tests.conftest import REPO_ROOT
from tests.faults_support import (
    Expected,
    check_streams,
    publish_invalid,
    settle,
    start_daemon,
    start_publisher,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

SLOW_DETECTION = {
    "HEARTBEAT_TTL_MS": 20_000,
    "TAKEOVER_BUFFER_MS": 30_000,
    "DEDUP_WINDOW_MS": 120_000,
}
THREADS = ["subscriber", "writer", "heartbeat", "consumer"]


class Fault:
    """Raises RuntimeError in the wrapped call once armed."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.fired = threading.Event()

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def faulty(*args: Any, **kwargs: Any) -> Any:
            if self.armed.is_set():
                self.fired.set()
                raise RuntimeError("injected fault")
            return original(*args, **kwargs)

        return faulty


def _inject(thread: str, consumer: Consumer, fault: Fault, monkeypatch: pytest.MonkeyPatch) -> None:
    if thread == "subscriber":
        monkeypatch.setattr(consumer, "_route", fault.wrap(consumer._route))
    elif thread == "writer":
        monkeypatch.setattr(Writer, "write", fault.wrap(Writer.write))
    elif thread == "heartbeat":
        monkeypatch.setattr(Heartbeat, "beat", fault.wrap(Heartbeat.beat))
    else:  # the consumer's own loop, which runs the handler
        monkeypatch.setattr(consumer, "_handle", fault.wrap(consumer._handle))


@pytest.mark.parametrize("thread", THREADS)
def test_a_thread_that_dies_makes_its_consumer_leave_and_the_survivor_writes_its_share(
    procs, redis_url, bclient, tmp_path: Path, monkeypatch, caplog, thread: str
):
    caplog.set_level(logging.INFO)
    survivor = start_daemon(procs, redis_url, "partitioned", count=1, **SLOW_DETECTION)
    settings = Settings(
        redis_url=redis_url,
        heartbeat_interval_ms=200,
        heartbeat_ttl_ms=SLOW_DETECTION["HEARTBEAT_TTL_MS"],
        takeover_buffer_ms=SLOW_DETECTION["TAKEOVER_BUFFER_MS"],
        dedup_window_ms=SLOW_DETECTION["DEDUP_WINDOW_MS"],
    )
    consumer = Consumer(settings, slot=7)
    fault = Fault()
    _inject(thread, consumer, fault, monkeypatch)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            consumer.run()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    runner = threading.Thread(target=run, name="consumer-under-test")
    runner.start()
    try:
        wait_until(lambda: len(survivor.listed()) == 2, 20, message="consumer never joined")
        victim = survivor.ids()[os.getpid()]
        publish_invalid(bclient, thread)
        publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 3.0, rate=1000)
        publisher.wait_published(1000)
        fault.armed.set()
        runner.join(timeout=30)
        assert not runner.is_alive(), f"{thread}: the consumer did not stop"
    finally:
        consumer.stop.set()
        runner.join(timeout=30)

    assert fault.fired.is_set()
    assert len(outcome) == 1 and isinstance(outcome[0], ConsumerFailed), outcome
    assert thread in str(outcome[0])
    # Left at once, long before its 20 s heartbeat would have expired.
    assert victim not in survivor.listed()
    departures = [fields for _, fields in bclient.xrange("processor:departures")]
    assert [d[b"consumer_id"].decode() for d in departures] == [victim]
    assert f"{thread} thread failed" in departures[0][b"reason"].decode()
    died = [record for record in caplog.records if "thread died" in record.getMessage()]
    assert len(died) == 1 and died[0].exc_info is not None, [r.getMessage() for r in died]
    # What it held unwritten is counted as left to the survivor's takeover, never as lost=0
    # with nothing said: a writer that died holds the batch it was writing, a loop that died
    # the batch it was handling.
    stopped = [r.getMessage() for r in caplog.records if "consumer stopped:" in r.getMessage()]
    assert len(stopped) == 1, stopped
    counts = dict(re.findall(r"(\w+)=(\d+)", stopped[0]))
    assert counts["lost"] == "0", stopped
    left = int(counts["left_to_takeover"])
    if thread in ("writer", "consumer"):
        assert left > 0, stopped
    assert int(bclient.hget("processor:stats", "left_to_takeover") or 0) == left

    print(thread, publisher.finish())
    expected = Expected(publisher.records())
    settled = settle(bclient, expected, timeout=20)
    summary = check_streams(bclient, expected, thread)
    assert settled, summary
    survivor.stop(thread)


def test_a_consumer_process_whose_thread_dies_exits_non_zero_after_leaving(redis_url, r):
    """The process-level contract the supervisor relies on: exit code 1, the id unlisted."""
    script = f"""
import multiprocessing, sys
from processor.config import Settings
from processor.consumer.heartbeat import Heartbeat
from processor.consumer.stats import ConsumerStats
from processor.group.slot import consumer_process

beats = 0
original = Heartbeat.beat

def beat(self):
    global beats
    beats += 1
    if beats > 3:
        raise RuntimeError("injected fault")
    return original(self)

Heartbeat.beat = beat
settings = Settings(redis_url={redis_url!r}, heartbeat_interval_ms=100, heartbeat_ttl_ms=20000,
                    takeover_buffer_ms=30000, dedup_window_ms=120000)
consumer_process(settings, 0, ConsumerStats(multiprocessing.get_context("spawn")))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count("thread died") == 1, done.stderr[-3000:]
    assert done.stderr.count("Traceback") == 1, done.stderr[-3000:]
    assert r.llen("consumer:ids") == 0
    assert r.xlen("processor:departures") == 1
