"""One measured publication: the Bench, Redis and /proc probes, the output stream read as a Run."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import redis

from demo.benchmark.plan import KEYS, Plan
from demo.benchmark.publishing import Published, PublishJob

POLL_S = 0.05
QUIET_S = 2.0  # the output stream not growing for this long: the run is over, short of messages
START_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 180.0
# A paced run kept up when its last write came within this of its last publish: a consumer that
# keeps up lags by about one batch window; one that falls behind by a share of the whole run.
LAG_S = 0.25
PUBLISHER_SHARE = 0.9  # the publisher reached less than this share of the target: it is the limit


class BenchError(RuntimeError):
    """Raised when a run cannot be measured: the daemon died or never became ready."""


def poll(condition: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"gave up after {timeout_s:g} s waiting for {what}")
        time.sleep(POLL_S)


def flush(client: redis.Redis) -> None:
    client.flushall()
    client.config_resetstat()


def reset_output(client: redis.Redis) -> None:
    """Between the steps of a ramp: an empty output stream and counters, the group untouched."""
    client.delete(KEYS.output, KEYS.stats)
    client.config_resetstat()


def redis_cpu_us(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"] + info["used_cpu_user"]) * 1e6


def redis_commands(client: redis.Redis) -> int:
    """Calls of every command since CONFIG RESETSTAT, those made inside scripts included."""
    return sum(int(stat["calls"]) for stat in client.info("commandstats").values())


def redis_write_us(client: redis.Redis, scripted: bool) -> float:
    """Time Redis accounts to the writes (``INFO commandstats``) since CONFIG RESETSTAT.

    A script call's time includes the commands it runs, which are also listed on their own:
    for a scripted write count the script calls only; for pipelined writes add their SET and
    XADD. Script calls include the heartbeat's, a few per second, in both cases.
    """
    stats = client.info("commandstats")
    names = ["cmdstat_evalsha"] + ([] if scripted else ["cmdstat_set", "cmdstat_xadd"])
    return float(sum(int(stats[name]["usec"]) for name in names if name in stats))


def process_cpu_us(pid: int) -> float:
    """CPU time of every thread of ``pid``, from schedstat (nanoseconds, unlike stat's ticks)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            total_ns += int((task / "schedstat").read_text().split()[0])
    return total_ns / 1000


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


@dataclass
class Output:
    """What the output stream holds after a run."""

    entries: int = 0
    unique: int = 0
    last_ms: int = 0
    by_consumer: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[int] = field(default_factory=list)


def stream_page(client: redis.Redis, start: bytes) -> list[tuple[bytes, dict[bytes, bytes]]]:
    page: Any = client.xrange(KEYS.output, start, b"+", count=10_000)
    return list(page)


def read_output(client: redis.Redis, latency: bool = False) -> Output:
    output = Output()
    ids: set[bytes] = set()
    start = b"-"
    while batch := stream_page(client, start):
        for entry_id, fields in batch:
            ids.add(fields[b"message_id"])
            output.by_consumer[fields[b"consumer_id"].decode()] += 1
            if latency:
                published_ms = json.loads(fields[b"data"])["published_at"]
                output.latencies_ms.append(entry_ms(entry_id) - published_ms)
        output.entries += len(batch)
        start = b"(" + batch[-1][0]
        output.last_ms = entry_ms(batch[-1][0])
    output.unique = len(ids)
    return output


def wait_for_output(client: redis.Redis, expected: int) -> None:
    """Until the stream holds ``expected`` entries or has stopped growing for QUIET_S."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    length, changed = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_length = int(client.xlen(KEYS.output))
        if now_length >= expected:
            return
        if now_length != length:
            length, changed = now_length, time.monotonic()
        elif time.monotonic() - changed >= QUIET_S:
            return
        time.sleep(POLL_S)


# -- one measured publication ------------------------------------------------------------------


@dataclass
class Run:
    """One publication and what reached the output stream."""

    target_rate: float  # 0: a burst, published as fast as the publisher goes
    published: int
    unreceived: int
    offered_rate: float
    written: int  # unique message ids in the output stream
    duplicates: int  # stream entries beyond one per id
    lost: int  # published to at least one subscriber, never written
    written_rate: float  # written / (last write - first publish)
    drain_s: float  # from the last publish to the last write
    problems: str  # lost, duplicated or unreceived messages; "" when none

    @property
    def lagged(self) -> bool:
        return bool(self.target_rate) and self.drain_s > LAG_S

    @property
    def sustained(self) -> bool:
        return not self.problems and not self.lagged

    @property
    def publisher_limited(self) -> bool:
        return bool(self.target_rate) and self.offered_rate < PUBLISHER_SHARE * self.target_rate


def problems_of(lost: int, duplicates: int, unreceived: int) -> str:
    counts = (("lost", lost), ("duplicated", duplicates), ("unreceived", unreceived))
    return ", ".join(f"{label} {count:,}" for label, count in counts if count)


def measure(bench: Bench, count: int, rate: float, latency: bool = False) -> tuple[Run, Output]:
    return outcome(bench, publish_and_wait(bench, count, rate), latency)


def publish_and_wait(bench: Bench, count: int, rate: float) -> Published:
    published = bench.publish(count, rate)
    wait_for_output(bench.client, published.count - published.unreceived)
    return published


def outcome(bench: Bench, published: Published, latency: bool = False) -> tuple[Run, Output]:
    """Reads the output stream and compares it with what was published."""
    received = published.count - published.unreceived
    output = read_output(bench.client, latency)
    window_s = (output.last_ms - published.first_ms) / 1000
    written_rate = output.unique / window_s if window_s > 0 else 0.0
    lost = received - output.unique
    duplicates = output.entries - output.unique
    run = Run(
        target_rate=published.target_rate,
        published=published.count,
        unreceived=published.unreceived,
        offered_rate=published.rate,
        written=output.unique,
        duplicates=duplicates,
        lost=lost,
        written_rate=written_rate,
        drain_s=max(0.0, window_s - published.elapsed_s),
        problems=problems_of(lost, duplicates, published.unreceived),
    )
    return run, output


class Bench:
    """What every scenario uses: the plan, Redis, the publisher and the daemon log."""

    def __init__(self, plan: Plan, url: str, publisher: Connection, log: TextIO) -> None:
        self.plan = plan
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.log = log
        self._publisher = publisher
        self._tags = itertools.count(1)
        self._started = time.monotonic()

    def publish(self, count: int, rate: float) -> Published:
        self._publisher.send(PublishJob(count, rate, f"m{next(self._tags)}"))
        published: Published = self._publisher.recv()
        return published

    def progress(self, label: str, run: Run, note: str = "") -> None:
        print(
            f"[{time.monotonic() - self._started:4.0f} s] {label:<38}"
            f" offered {run.offered_rate:>9,.0f}/s  written {run.written_rate:>9,.0f}/s"
            f"  lost {run.lost:,}  dup {run.duplicates:,}  {note}",
            flush=True,
        )
