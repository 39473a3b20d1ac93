"""Issue 6's benchmark: ``python demo/bench.py [--quick] [--publish-chart]``, or ``make bench``.

Starts a private redis-server, then runs every scenario with both strategies: each run starts
``demo/consume.py`` on a flushed Redis, waits for the whole group to be live, publishes from a
separate process (pipelines of PUBLISH, messages built in advance) and measures what reaches
the output stream. Prints one table with the targets of issue 6, writes
``bench-results/bench.json`` and ``bench-results/throughput.png``.

Scenarios (issue 6 numbering):
  0  baseline: one plain redis-py subscriber (PubSub.listen, XADD pipelined per 100, no locks)
  1  trivial handler: the offered rate is stepped up until a step loses or duplicates messages
     or lags (last write more than LAG_S after the last publish); reports the best step
  2  cpu_100us handler: drain rate of a burst
  3  io_2ms and async_io_2ms handlers: drain rate; async_io_2ms at HANDLER_CONCURRENCY 16 too
  4  cost per written message at a moderate rate: Redis commands, Redis CPU, consumer CPU
  5  publish-to-stream latency at half the best rate of scenario 1
  6  Redis memory per message kept for deduplication (measured in the runs of scenario 4)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.config import DAEMON_OPTIONS, Settings
from processor.handlers import add_random_score
from processor.keys import Keys
from processor.redis_server import RedisServer, RedisServerFailed, RedisServerNotFound

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Settings()
KEYS = Keys.from_settings(DEFAULTS)
RESULTS_DIR = ROOT / "bench-results"
DOCS_CHART = ROOT / "docs" / "throughput.png"
STRATEGIES = ("partitioned", "race")
MANY_CONSUMERS = 8  # the targets of issue 6 compare 8 consumers with 1

PIPELINE_SIZE = 1000  # PUBLISH commands per publisher pipeline
PLAIN_BATCH = 100  # XADD commands per pipeline of the baseline subscriber
POLL_S = 0.05
QUIET_S = 2.0  # the output stream not growing for this long: the run is over, short of messages
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 180.0
# A paced run kept up when its last write came within this of its last publish: a consumer that
# keeps up lags by about one batch window; one that falls behind by a share of the whole run.
LAG_S = 0.25
PUBLISHER_SHARE = 0.9  # the publisher reached less than this share of the target: it is the limit
# A burst is published as fast as possible and waits in Redis and in the consumers' sockets and
# inboxes: keep it well under the 8 MB soft Pub/Sub output buffer limit (about 190 B a message).
BURST_MAX = 40_000
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MISSING_MATPLOTLIB = (
    "matplotlib is missing: pip install -r bench-requirements.txt (make bench does)"
)
TEXT = b"the quick brown fox jumps over the lazy dog, benchmark payload 0123"


@dataclass(frozen=True)
class HandlerCase:
    """A handler as the bench runs it, with a rough capacity of one consumer to size bursts."""

    name: str
    spec: str  # the HANDLER setting; "" for the daemon's default
    concurrency: int = 1
    capacity: float = 0.0  # msg/s one consumer drains, roughly
    cpu_bound: bool = False


TRIVIAL = HandlerCase("trivial", "")
CPU = HandlerCase("cpu_100us", "demo.bench_handlers:cpu_100us", capacity=8_000, cpu_bound=True)
IO = HandlerCase("io_2ms", "demo.bench_handlers:io_2ms", capacity=450)
ASYNC_IO = HandlerCase("async_io_2ms", "demo.bench_handlers:async_io_2ms", capacity=450)
ASYNC_IO_16 = HandlerCase(
    "async_io_2ms", "demo.bench_handlers:async_io_2ms", concurrency=16, capacity=6_000
)


@dataclass(frozen=True)
class Plan:
    """How much of each scenario to run."""

    consumer_counts: tuple[int, ...]
    ramp_rates: tuple[int, ...]  # msg/s offered in scenario 1, in order
    step_s: float  # publishing time of one ramp step
    sweep: tuple[HandlerCase, ...]  # drained at every consumer count (ASYNC_IO_16 at 1 always)
    work_s: float  # a drain burst holds about this much work at the expected drain rate
    cost_rate: int
    cost_s: float
    latency_s: float


FULL = Plan(
    consumer_counts=(1, 2, 4, 8),
    ramp_rates=(25_000, 40_000, 50_000, 60_000, 70_000, 80_000, 90_000, 100_000, 125_000, 150_000),
    step_s=3,
    sweep=(CPU, IO, ASYNC_IO),
    work_s=3,
    cost_rate=20_000,
    cost_s=5,
    latency_s=5,
)
QUICK = Plan(
    consumer_counts=(1, 2, 4),
    ramp_rates=(25_000, 50_000, 75_000),
    step_s=1,
    sweep=(CPU, IO),
    work_s=1,
    cost_rate=20_000,
    cost_s=1.5,
    latency_s=1.5,
)


class BenchError(RuntimeError):
    """Raised when a run cannot be measured: the daemon died or never became ready."""


# -- the publisher (a process of its own, so it does not share the bench's GIL) ---------------


@dataclass(frozen=True)
class PublishJob:
    count: int
    rate: float  # msg/s; 0 publishes as fast as the pipelines go
    tag: str  # keeps message ids unique across the whole bench


@dataclass(frozen=True)
class Published:
    target_rate: float
    count: int
    unreceived: int  # PUBLISH replied 0: no subscriber got the message
    first_ms: int  # wall clock of the first PUBLISH
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.count / self.elapsed_s if self.elapsed_s else 0.0


def message_heads(job: PublishJob) -> list[bytes]:
    """The messages, built in advance but for ``published_at``, which the send appends."""
    return [
        b'{"message_id":"%s-%08d","source":"bench","text":"%s","published_at":'
        % (job.tag.encode(), index, TEXT)
        for index in range(job.count)
    ]


def publish(client: redis.Redis, job: PublishJob) -> Published:
    heads = message_heads(job)
    channel = DEFAULTS.input_channel
    interval_s = PIPELINE_SIZE / job.rate if job.rate else 0.0
    unreceived = 0
    first_ms = 0
    started = time.monotonic()
    for number, start in enumerate(range(0, job.count, PIPELINE_SIZE)):
        # Pacing to a schedule, not synchronisation: the publisher keeps a steady rate.
        delay = started + number * interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent_ms = time.time_ns() // 1_000_000
        first_ms = first_ms or sent_ms
        tail = b"%d}" % sent_ms
        pipe = client.pipeline(transaction=False)
        for head in heads[start : start + PIPELINE_SIZE]:
            pipe.publish(channel, head + tail)
        unreceived += pipe.execute().count(0)
    return Published(job.rate, job.count, unreceived, first_ms, time.monotonic() - started)


def publisher_loop(url: str, jobs: Connection) -> None:
    """The publisher process: runs jobs until it receives None."""
    client = redis.Redis.from_url(url)
    while (job := jobs.recv()) is not None:
        jobs.send(publish(client, job))
    client.close()


@contextlib.contextmanager
def publisher_process(url: str) -> Iterator[Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=publisher_loop, args=(url, theirs), name="bench-publisher")
    process.start()
    theirs.close()  # so a dead publisher reads as EOFError here, not as a hang
    try:
        yield ours
    finally:
        with contextlib.suppress(OSError):
            ours.send(None)
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()


# -- the baseline: a plain subscriber, no locks ------------------------------------------------


def plain_subscriber_loop(url: str) -> None:
    """redis-py's PubSub.listen(), the default handler, XADD pipelined per 100, no locks."""
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(DEFAULTS.input_channel)
    pipe = client.pipeline(transaction=False)
    for message in pubsub.listen():
        body = add_random_score(json.loads(message["data"]))
        data = json.dumps(body, separators=(",", ":"))
        pipe.xadd(
            KEYS.output, {"message_id": body["message_id"], "consumer_id": "plain", "data": data}
        )
        if len(pipe) >= PLAIN_BATCH:
            pipe.execute()


@contextlib.contextmanager
def plain_subscriber(bench: Bench) -> Iterator[None]:
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=plain_subscriber_loop, args=(bench.url,), name="bench-plain")
    process.start()
    try:
        channel = DEFAULTS.input_channel
        poll(lambda: bench.client.pubsub_numsub(channel)[0][1] == 1, "the plain subscriber")
        yield
    finally:
        process.terminate()
        process.join(STOP_TIMEOUT_S)


# -- the daemon under test -------------------------------------------------------------------


def daemon_env(bench: Bench, strategy: str, consumers: int, case: HandlerCase) -> dict[str, str]:
    """The daemon's defaults but for these settings, whatever the caller's environment says."""
    settings = {option.env for option in DAEMON_OPTIONS}
    env = {name: value for name, value in os.environ.items() if name not in settings}
    env |= {
        "REDIS_URL": bench.url,
        "CONSUMERS_COUNT": str(consumers),
        "STRATEGY": strategy,
        "HANDLER_CONCURRENCY": str(case.concurrency),
        "MONITORING_INTERVAL": "3600",
        "LOGLEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),  # spawned consumers import demo.bench_handlers
        "PYTHONUNBUFFERED": "1",
    }
    if case.spec:
        env["HANDLER"] = case.spec
    return env


@contextlib.contextmanager
def daemon(bench: Bench, strategy: str, consumers: int, case: HandlerCase) -> Iterator[list[str]]:
    """Runs demo/consume.py on a flushed Redis; yields the consumer ids once all are live."""
    flush(bench.client)
    bench.log.write(f"--- {strategy} x{consumers} {case.name} concurrency={case.concurrency}\n")
    bench.log.flush()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "demo" / "consume.py")],
        env=daemon_env(bench, strategy, consumers, case),
        stdout=bench.log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ids = wait_for_group(bench.client, consumers, proc)
        if strategy == "partitioned":
            wait_for_heartbeats(bench.client, ids)
        yield ids
    finally:
        stop(proc)


def wait_for_group(client: redis.Redis, consumers: int, proc: subprocess.Popen[bytes]) -> list[str]:
    def complete() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"the daemon exited with code {proc.returncode}: see daemon.log")
        return bool(client.llen(KEYS.consumers) == consumers)

    poll(complete, f"{consumers} consumers to register")
    members: Any = client.lrange(KEYS.consumers, 0, -1)
    return [member.decode() for member in members]


def wait_for_heartbeats(client: redis.Redis, ids: list[str]) -> None:
    """Waits until every consumer has beaten since the group was complete.

    A consumer learns who is live at its heartbeat, which re-arms its key's TTL. Once each TTL
    has gone up, every consumer owns its share: a burst published earlier would be routed by
    stale views and measure that instead.
    """
    keys = [KEYS.heartbeat(consumer_id) for consumer_id in ids]
    beaten: set[str] = set()
    last = ttls_ms(client, keys)

    def all_beaten() -> bool:
        nonlocal last
        now = ttls_ms(client, keys)
        beaten.update(
            key for key, before, after in zip(keys, last, now, strict=True) if after > before
        )
        last = now
        return len(beaten) == len(keys)

    poll(all_beaten, "every consumer to see the whole group")


def ttls_ms(client: redis.Redis, keys: list[str]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    return [int(ttl) for ttl in pipe.execute()]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kills the daemon's whole session: its graceful stop is not what the bench measures."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def consumer_pid(consumer_id: str) -> int:
    """Consumer ids are ``host-pid-slot-suffix`` (the host name may hold dashes)."""
    return int(consumer_id.rsplit("-", 3)[1])


# -- Redis and /proc readings ------------------------------------------------------------------


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


# -- scenarios 0 and 1: the highest sustained lossless rate -------------------------------------


@dataclass
class Ramp:
    """The offered rate stepped up until a step is not sustained or the publisher tops out."""

    strategy: str  # or "plain" for the baseline
    consumers: int
    steps: list[Run]

    @property
    def best(self) -> Run | None:
        return max(
            (s for s in self.steps if s.sustained), key=lambda s: s.written_rate, default=None
        )

    @property
    def end(self) -> str:
        last = self.steps[-1]
        if last.problems:
            return f"at {last.target_rate:,.0f}/s: {last.problems}"
        if last.lagged:
            return f"at {last.target_rate:,.0f}/s: lagged {last.drain_s:.2f} s behind"
        if last.publisher_limited:
            return f"publisher reached {last.offered_rate:,.0f} of {last.target_rate:,.0f}/s"
        return "top of the ramp reached"


def ramp(
    bench: Bench, strategy: str, consumers: int, runner: contextlib.AbstractContextManager[Any]
) -> Ramp:
    steps: list[Run] = []
    with runner:
        for rate in bench.plan.ramp_rates:
            reset_output(bench.client)
            run, _ = measure(bench, round(rate * bench.plan.step_s), rate)
            steps.append(run)
            bench.progress(
                f"ramp {strategy} x{consumers} @{rate:,}/s",
                run,
                f"lag {run.drain_s:.2f} s {run.problems}",
            )
            if not run.sustained or run.publisher_limited:
                break
    return Ramp(strategy, consumers, steps)


def baseline(bench: Bench) -> Ramp:
    flush(bench.client)
    return ramp(bench, "plain", 1, plain_subscriber(bench))


def max_lossless(bench: Bench, strategy: str, consumers: int) -> Ramp:
    return ramp(bench, strategy, consumers, daemon(bench, strategy, consumers, TRIVIAL))


# -- scenarios 2 and 3: drain rate of a burst ---------------------------------------------------


@dataclass
class Drain:
    handler: str
    strategy: str
    consumers: int
    concurrency: int
    run: Run


def burst_size(case: HandlerCase, strategy: str, consumers: int, work_s: float) -> int:
    """About ``work_s`` of work at the drain rate we expect."""
    workers = 1 if strategy == "race" else consumers
    if case.cpu_bound:
        workers = min(workers, os.cpu_count() or 1)
    return min(BURST_MAX, max(100, int(round(case.capacity * workers * work_s, -2))))


def drain(bench: Bench, case: HandlerCase, strategy: str, consumers: int) -> Drain:
    count = burst_size(case, strategy, consumers, bench.plan.work_s)
    with daemon(bench, strategy, consumers, case):
        run, _ = measure(bench, count, 0)
    label = f"drain {case.name} c{case.concurrency} {strategy} x{consumers}"
    bench.progress(label, run, f"burst {count:,}")
    return Drain(case.name, strategy, consumers, case.concurrency, run)


# -- scenarios 4 and 6: cost per written message, memory per lock ------------------------------


@dataclass
class ConsumerCpu:
    consumer_id: str
    received: int
    written: int  # what this consumer owned (partitioned) or won the lock for (race)
    cpu_us: float


@dataclass
class Memory:
    used_delta_bytes: int  # INFO used_memory after - before
    stream_bytes: int  # MEMORY USAGE of the output stream
    bytes_per_lock: float  # (used_delta - stream) / written
    sample_lock_bytes: int  # MEMORY USAGE of one lock key


@dataclass
class Cost:
    strategy: str
    consumers: int
    run: Run
    commands_per_msg: float
    redis_us_per_msg: float
    consumer_us_per_msg: float  # all consumers together
    consumers_cpu: list[ConsumerCpu]
    memory: Memory


def cost(bench: Bench, strategy: str, consumers: int) -> Cost:
    client = bench.client
    plan = bench.plan
    with daemon(bench, strategy, consumers, TRIVIAL) as ids:
        pids = [consumer_pid(consumer_id) for consumer_id in ids]
        client.config_resetstat()
        used_before = int(client.info("memory")["used_memory"])
        redis_before = redis_cpu_us(client)
        cpu_before = [process_cpu_us(pid) for pid in pids]
        published = publish_and_wait(bench, round(plan.cost_rate * plan.cost_s), plan.cost_rate)
        # Read before the bench's own XRANGE over the output adds to Redis's figures.
        cpu_after = [process_cpu_us(pid) for pid in pids]
        redis_after = redis_cpu_us(client)
        commands = redis_commands(client)
        used_delta = int(client.info("memory")["used_memory"]) - used_before
        run, output = outcome(bench, published)
        memory = measure_memory(client, used_delta, run.written)
    received = run.published - run.unreceived
    per_consumer = [
        ConsumerCpu(consumer_id, received, output.by_consumer[consumer_id], after - before)
        for consumer_id, before, after in zip(ids, cpu_before, cpu_after, strict=True)
    ]
    written = max(run.written, 1)
    result = Cost(
        strategy=strategy,
        consumers=consumers,
        run=run,
        commands_per_msg=commands / written,
        redis_us_per_msg=(redis_after - redis_before) / written,
        consumer_us_per_msg=sum(c.cpu_us for c in per_consumer) / written,
        consumers_cpu=per_consumer,
        memory=memory,
    )
    bench.progress(f"cost {strategy} x{consumers}", run, cost_note(result))
    return result


def measure_memory(client: redis.Redis, used_delta: int, written: int) -> Memory:
    stream = int(client.memory_usage(KEYS.output, samples=0) or 0)
    first: Any = client.xrange(KEYS.output, count=1)
    fields = first[0][1]
    sample = int(client.memory_usage(KEYS.lock(fields[b"message_id"].decode()), samples=0) or 0)
    return Memory(used_delta, stream, (used_delta - stream) / max(written, 1), sample)


def cost_note(cost: Cost) -> str:
    return (
        f"{cost.commands_per_msg:.2f} cmd/msg, Redis {cost.redis_us_per_msg:.1f} µs/msg, "
        f"consumers {cost.consumer_us_per_msg:.1f} µs/msg"
    )


@dataclass
class CpuSplit:
    """Consumer CPU per message: one it owns, and one it only reads and buffers."""

    owned_us: float
    buffered_us: float


def fit_split(points: list[ConsumerCpu]) -> CpuSplit | None:
    """Least squares of cpu = owned * c_owned + buffered * c_buffered over every consumer."""
    pairs = [(p.written, p.received - p.written, p.cpu_us) for p in points]
    oo = sum(o * o for o, _, _ in pairs)
    ob = sum(o * b for o, b, _ in pairs)
    bb = sum(b * b for _, b, _ in pairs)
    oy = sum(o * y for o, _, y in pairs)
    by = sum(b * y for _, b, y in pairs)
    determinant = oo * bb - ob * ob
    if not determinant:
        return None  # one consumer count alone cannot tell the two apart
    return CpuSplit((oy * bb - by * ob) / determinant, (oo * by - ob * oy) / determinant)


# -- scenario 5: latency at half the best rate -------------------------------------------------


@dataclass
class Latency:
    strategy: str
    consumers: int
    run: Run
    p50_ms: float
    p99_ms: float
    max_ms: float


def percentile(ordered: list[int], share: float) -> float:
    return float(ordered[max(0, math.ceil(share * len(ordered)) - 1)]) if ordered else math.nan


def latency(bench: Bench, strategy: str, best: Ramp) -> Latency | None:
    top = best.best
    if top is None:
        return None
    rate = round(top.offered_rate / 2, -3)
    with daemon(bench, strategy, best.consumers, TRIVIAL):
        run, output = measure(bench, round(rate * bench.plan.latency_s), rate, latency=True)
    ordered = sorted(output.latencies_ms)
    result = Latency(
        strategy,
        best.consumers,
        run,
        percentile(ordered, 0.5),
        percentile(ordered, 0.99),
        percentile(ordered, 1.0),
    )
    bench.progress(
        f"latency {strategy} x{best.consumers} @{rate:,.0f}/s", run, latency_note(result)
    )
    return result


def latency_note(result: Latency) -> str:
    return f"p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, max {result.max_ms:.0f} ms"


# -- the whole run -------------------------------------------------------------------------------


@dataclass
class Results:
    plan: Plan
    meta: dict[str, Any]
    baseline: Ramp
    ramps: list[Ramp]
    latencies: list[Latency]
    drains: list[Drain]
    costs: list[Cost]
    split: CpuSplit | None

    def ramp(self, strategy: str, consumers: int) -> Ramp | None:
        return next(
            (r for r in self.ramps if (r.strategy, r.consumers) == (strategy, consumers)), None
        )

    def drain(self, case: HandlerCase, strategy: str, consumers: int) -> Drain | None:
        key = (case.name, case.concurrency, strategy, consumers)
        return next(
            (d for d in self.drains if (d.handler, d.concurrency, d.strategy, d.consumers) == key),
            None,
        )

    def cost(self, strategy: str, consumers: int) -> Cost | None:
        return next(
            (c for c in self.costs if (c.strategy, c.consumers) == (strategy, consumers)), None
        )


def run_all(bench: Bench) -> Results:
    counts = bench.plan.consumer_counts
    print("0 baseline: plain subscriber", flush=True)
    plain = baseline(bench)
    print("1 trivial handler: highest sustained lossless rate", flush=True)
    ramps = [max_lossless(bench, s, n) for n in counts for s in STRATEGIES]
    print("5 latency at half the best rate", flush=True)
    latencies: list[Latency] = []
    for strategy in STRATEGIES:
        found = latency(bench, strategy, best_ramp([r for r in ramps if r.strategy == strategy]))
        if found is not None:
            latencies.append(found)
    print("2, 3 drain rate of a burst", flush=True)
    drains = [
        drain(bench, case, s, n) for case in bench.plan.sweep for n in counts for s in STRATEGIES
    ]
    drains += [drain(bench, ASYNC_IO_16, s, 1) for s in STRATEGIES]
    print(f"4, 6 cost per message at {bench.plan.cost_rate:,} msg/s", flush=True)
    costs = [cost(bench, s, n) for n in counts for s in STRATEGIES]
    points = [c for cost_ in costs if cost_.strategy == "partitioned" for c in cost_.consumers_cpu]
    return Results(bench.plan, {}, plain, ramps, latencies, drains, costs, fit_split(points))


def best_ramp(ramps: list[Ramp]) -> Ramp:
    return max(ramps, key=lambda r: r.best.written_rate if r.best else 0.0)


# -- the report ----------------------------------------------------------------------------------

HEADER = (
    *("scenario", "handler", "strategy", "cons", "conc"),
    *("offered msg/s", "written msg/s", "lost", "dup", "notes"),
)
NUMERIC_COLUMNS = {3, 4, 5, 6, 7, 8}


def cells(
    scenario: str,
    handler: str,
    strategy: str,
    consumers: int,
    concurrency: int,
    run: Run | None,
    note: str,
) -> tuple[str, ...]:
    figures = ("-",) * 4
    if run is not None:
        figures = (
            f"{run.offered_rate:,.0f}",
            f"{run.written_rate:,.0f}",
            f"{run.lost:,}",
            f"{run.duplicates:,}",
        )
    return (scenario, handler, strategy, str(consumers), str(concurrency), *figures, note)


def table_rows(results: Results) -> list[tuple[str, ...]]:
    plain = results.baseline
    rows = [cells("0 baseline", "trivial", "plain sub", 1, 1, plain.best, plain.end)]
    rows += [
        cells("1 max lossless", "trivial", r.strategy, r.consumers, 1, r.best, r.end)
        for r in results.ramps
    ]
    rows += [
        cells(
            f"{2 if d.handler == CPU.name else 3} drain",
            d.handler,
            d.strategy,
            d.consumers,
            d.concurrency,
            d.run,
            f"burst of {d.run.published:,}",
        )
        for d in results.drains
    ]
    rows += [
        cells("4 cost", "trivial", c.strategy, c.consumers, 1, c.run, cost_note(c))
        for c in results.costs
    ]
    rows += [
        cells("5 latency", "trivial", x.strategy, x.consumers, 1, x.run, latency_note(x))
        for x in results.latencies
    ]
    rows += [
        cells("6 memory", "trivial", c.strategy, c.consumers, 1, c.run, memory_note(c.memory))
        for c in results.costs
        if c.consumers == 1
    ]
    return rows


def memory_note(memory: Memory) -> str:
    sample = memory.sample_lock_bytes
    return f"{memory.bytes_per_lock:.0f} B per lock key (MEMORY USAGE of one: {sample} B)"


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], numeric: set[int]) -> str:
    widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in rows)])


@dataclass(frozen=True)
class Target:
    """One target of issue 6: a headline figure, per strategy, against a limit."""

    figure: str  # a key of headline()
    name: str
    limit: float
    at_least: bool  # True: the figure must reach the limit; False: stay within it
    unit: str = "x"

    @property
    def required(self) -> str:
        return f"{'>=' if self.at_least else '<='} {number(self.limit)}{self.unit}"

    def verdict(self, figure: float | None) -> str:
        if figure is None or math.isnan(figure):
            return "n/a"
        passed = figure >= self.limit if self.at_least else figure <= self.limit
        outcome = "PASS" if passed else f"MISS by {abs(figure - self.limit) / self.limit:.0%}"
        return f"{number(figure)}{self.unit} {outcome}"


TARGETS = (
    Target("best", "trivial: best sustained lossless written", 100_000, True, " msg/s"),
    Target("trivial_scaling", "trivial: 8 consumers / 1, lossless", 0.5, True),
    Target("cpu_2", "cpu_100us: 2 consumers / 1", 1.6, True),
    Target("cpu_many", "cpu_100us: 8 consumers / 1", 1.5, True),
    Target("io_many", "io_2ms: 8 consumers / 1", 6, True),
    Target("async_16", "1 consumer: async_io_2ms at concurrency 16 / io_2ms", 8, True),
    Target("commands", "Redis commands per msg: 8 consumers / 1", 1.1, False),
    Target("redis_cpu", "Redis CPU per msg: 8 consumers / 1", 1.4, False),
    Target("buffered", "consumer CPU per msg only read and buffered", 2, False, " µs"),
    Target("p99", "p99 latency at half the best rate", DEFAULTS.batch_window_ms + 25, False, " ms"),
)


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def headline(results: Results, strategy: str) -> dict[str, float | None]:
    """The figures the targets are about, for one strategy."""
    counts = results.plan.consumer_counts

    def lossless(consumers: int) -> float | None:
        found = results.ramp(strategy, consumers)
        if found is None:
            return None
        return found.best.written_rate if found.best else 0.0

    def drained(case: HandlerCase, consumers: int) -> float | None:
        found = results.drain(case, strategy, consumers)
        return found.run.written_rate if found else None

    one, many = results.cost(strategy, 1), results.cost(strategy, MANY_CONSUMERS)
    split = results.split if strategy == "partitioned" else None
    return {
        "best": max(lossless(n) or 0.0 for n in counts),
        "trivial_scaling": ratio(lossless(MANY_CONSUMERS), lossless(1)),
        "cpu_2": ratio(drained(CPU, 2), drained(CPU, 1)),
        "cpu_many": ratio(drained(CPU, MANY_CONSUMERS), drained(CPU, 1)),
        "io_many": ratio(drained(IO, MANY_CONSUMERS), drained(IO, 1)),
        "async_16": ratio(drained(ASYNC_IO_16, 1), drained(IO, 1)),
        "commands": ratio(many.commands_per_msg, one.commands_per_msg) if one and many else None,
        "redis_cpu": ratio(many.redis_us_per_msg, one.redis_us_per_msg) if one and many else None,
        "buffered": split.buffered_us if split else None,
        "p99": next((lat.p99_ms for lat in results.latencies if lat.strategy == strategy), None),
    }


def target_lines(results: Results) -> list[tuple[str, ...]]:
    figures = {strategy: headline(results, strategy) for strategy in STRATEGIES}
    return [
        (
            target.name,
            target.required,
            *(target.verdict(figures[s][target.figure]) for s in STRATEGIES),
        )
        for target in TARGETS
    ]


TARGETS_HEADER = ("target (issue 6)", "required", *STRATEGIES)


def print_report(results: Results) -> None:
    meta = results.meta
    print()
    print(
        f"processor benchmark ({'quick' if meta['quick'] else 'full'}): {meta['cpus']} CPUs, "
        f"redis-server {meta['redis_version']}, Python {meta['python']}, "
        f"{meta['message_bytes']}-byte messages, wall time {meta['wall_s']:.0f} s, "
        f"load average {meta['load_start']:.1f} at start, {meta['load_end']:.1f} at end"
    )
    print()
    print(format_table(HEADER, table_rows(results), NUMERIC_COLUMNS))
    split = results.split
    if split is not None:
        print(
            f"\nconsumer CPU per message (partitioned, least squares over every consumer): "
            f"owned {split.owned_us:.1f} µs, only read and buffered {split.buffered_us:.1f} µs"
        )
    print()
    print(format_table(TARGETS_HEADER, target_lines(results), set()))


def write_json(results: Results, path: Path) -> None:
    document = asdict(results)
    document["targets"] = [
        dict(zip(TARGETS_HEADER, line, strict=True)) for line in target_lines(results)
    ]
    document["headline"] = {strategy: headline(results, strategy) for strategy in STRATEGIES}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def chart_series(results: Results, strategy: str) -> dict[str, list[float]]:
    """Written msg/s by consumer count for each handler: scenario 1's best, 2 and 3's drains."""
    counts = results.plan.consumer_counts
    ramps = [results.ramp(strategy, n) for n in counts]
    series = {TRIVIAL.name: [r.best.written_rate if r and r.best else math.nan for r in ramps]}
    for case in results.plan.sweep:
        drains = [results.drain(case, strategy, n) for n in counts]
        series[case.name] = [d.run.written_rate if d else math.nan for d in drains]
    return series


def draw_chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = results.plan.consumer_counts
    colours = {TRIVIAL.name: "tab:blue", CPU.name: "tab:red", IO.name: "tab:green"}
    colours[ASYNC_IO.name] = "tab:purple"
    figure, axes = plt.subplots(figsize=(11, 5.5))
    for strategy, style in zip(STRATEGIES, ("-", "--"), strict=True):
        for name, values in chart_series(results, strategy).items():
            label = f"{name} ({strategy})"
            axes.plot(counts, values, style, marker="o", color=colours[name], label=label)
        concurrent = results.drain(ASYNC_IO_16, strategy, 1)
        if concurrent is not None:
            label = f"async_io_2ms, concurrency 16 ({strategy})"
            marker = "D" if strategy == "partitioned" else "d"
            axes.plot([1], [concurrent.run.written_rate], marker, color="tab:purple", label=label)
    plain = results.baseline.best
    if plain is not None:
        label = "plain subscriber, no locks"
        axes.plot([1], [plain.written_rate], "k*", markersize=12, label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(counts, [str(n) for n in counts])
    axes.set_yscale("log")
    axes.set_xlabel("consumers")
    axes.set_ylabel("written msg/s")
    run = "quick run" if results.meta["quick"] else "full run"
    axes.set_title(f"processor: written msg/s by consumers ({results.meta['cpus']} CPUs, {run})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine_meta(quick: bool, client: redis.Redis) -> dict[str, Any]:
    sample = message_heads(PublishJob(1, 0, "m1"))[0] + b"%d}" % (time.time_ns() // 1_000_000)
    return {
        "quick": quick,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_version": client.info("server")["redis_version"],
        "message_bytes": len(sample),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure_everything(plan: Plan, quick: bool) -> Results:
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    with (
        RedisServer() as server,
        publisher_process(server.url) as publisher,
        open(RESULTS_DIR / "daemon.log", "w", encoding="utf-8") as log,
    ):
        bench = Bench(plan, server.url, publisher, log)
        meta = machine_meta(quick, bench.client)
        results = run_all(bench)
        bench.client.close()
    meta |= {"wall_s": time.monotonic() - started, "load_start": load_start}
    results.meta = meta | {"load_end": os.getloadavg()[0]}
    return results


def save(results: Results, publish_chart: bool) -> None:
    write_json(results, RESULTS_DIR / "bench.json")
    chart = RESULTS_DIR / "throughput.png"
    draw_chart(results, chart)
    written = [RESULTS_DIR / "bench.json", chart]
    if publish_chart:
        DOCS_CHART.parent.mkdir(exist_ok=True)
        shutil.copyfile(chart, DOCS_CHART)
        written.append(DOCS_CHART)
    print("\nwrote " + ", ".join(str(path.relative_to(ROOT)) for path in written))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rates and consumer counts, shorter runs (a minute or so)",
    )
    parser.add_argument(
        "--publish-chart",
        action="store_true",
        help=f"also copy the chart to {DOCS_CHART.relative_to(ROOT)} for the README",
    )
    args = parser.parse_args()
    if importlib.util.find_spec("matplotlib") is None:
        print(f"bench.py: error: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return EXIT_USAGE
    RESULTS_DIR.mkdir(exist_ok=True)
    try:
        results = measure_everything(QUICK if args.quick else FULL, args.quick)
    except (BenchError, RedisServerNotFound, RedisServerFailed) as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_report(results)
    save(results, args.publish_chart)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
