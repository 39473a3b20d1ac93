"""The subscribers under test: demo/consume.py runs (whole group live) and the plain baseline."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import redis

from demo.benchmark.measure import Bench, BenchError, flush, poll
from demo.benchmark.plan import (
    DEDUP,
    DEFAULTS,
    KEYS,
    ROOT,
    STOP_TIMEOUT_S,
    WRITE_PATH_ENV,
    HandlerCase,
)
from processor.config import DAEMON_OPTIONS, Settings
from processor.consumer.ownership import handover_grace_s
from processor.handlers import add_random_score

PLAIN_BATCH = 100  # XADD commands per pipeline of the baseline subscriber
BASELINE_HANDLER = "demo.benchmark.write_paths:add_random_score"


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


def daemon_env(
    bench: Bench, strategy: str, consumers: int, case: HandlerCase, path: str
) -> dict[str, str]:
    """The daemon's defaults but for these settings, whatever the caller's environment says."""
    settings = {option.env for option in DAEMON_OPTIONS} | {WRITE_PATH_ENV}
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
    if path != DEDUP:
        if case.spec:
            raise BenchError(f"the {path} write path runs with the default handler only")
        env |= {"HANDLER": BASELINE_HANDLER, WRITE_PATH_ENV: path}
    return env


@contextlib.contextmanager
def daemon(
    bench: Bench,
    strategy: str,
    consumers: int,
    case: HandlerCase,
    path: str = DEDUP,
) -> Iterator[list[str]]:
    """Runs demo/consume.py on a flushed Redis; yields the consumer ids once all are live."""
    flush(bench.client)
    bench.log.write(
        f"--- {strategy} x{consumers} {case.name} concurrency={case.concurrency} {path}\n"
    )
    bench.log.flush()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "demo" / "consume.py")],
        env=daemon_env(bench, strategy, consumers, case, path),
        stdout=bench.log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ids = wait_for_group(bench.client, consumers, proc)
        if strategy == "partitioned":
            wait_for_heartbeats(bench.client, ids)
            # A consumer that handed slots to a newcomer keeps trying them for a grace period
            # that began at the latest with the beat just seen; wait it out, or a burst is
            # processed twice and the bench measures the join instead of the group.
            time.sleep(handover_grace_s(Settings().heartbeat_interval_ms))
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


def consumer_slot(consumer_id: str) -> int:
    return int(consumer_id.rsplit("-", 3)[2])
