"""The one-command demo: Redis, the daemon, the publisher, then a check that nothing was lost.

Uses the Redis configured by REDIS_URL or REDIS_HOST/REDIS_PORT when it answers, under stream
names of its own; otherwise starts a throwaway redis-server. With ``--cluster``, a throwaway
Redis Cluster (three primaries with a replica each) and three partitions instead.
``python demo/run_demo.py --help``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.redis_cluster import ClusterUnavailable, LocalCluster
from demo.redis_server import RedisServer, exit_cleanly_on_sigterm, find_redis_server
from processor.config import RedisSettings
from processor.loading import load_status_settings
from processor.store.keys import Keys

DEMO_DIR = Path(__file__).resolve().parent
WAIT_S = 30.0
CLUSTER_PARTITIONS = 3
INVALID_PAYLOADS = [b"not json at all", b'{"text": "no message_id"}', b'{"message_id": ""}']


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def configured_url() -> str | None:
    """The user's Redis if the environment names one and it answers PING within 1 s."""
    env = os.environ
    if "REDIS_URL" in env:
        url = env["REDIS_URL"]
    elif "REDIS_HOST" in env or "REDIS_PORT" in env:
        port = int(env.get("REDIS_PORT", "6379"))
        url = RedisSettings(env.get("REDIS_HOST", "localhost"), port).url
    else:
        return None
    client = redis.Redis.from_url(
        url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        say(f"configured Redis is not reachable ({error}): using a throwaway server instead")
        return None
    finally:
        client.close()
    return url


def wait_for(what: str, done: Callable[[], bool], daemon: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not done():
        if daemon.poll() is not None:
            say(f"the daemon exited with code {daemon.returncode} while waiting for {what}")
            return False
        if time.monotonic() >= deadline:
            say(f"gave up after {WAIT_S:g} s waiting for {what}")
            return False
        time.sleep(0.1)
    return True


def stream_ids(client: Any, stream: str) -> Iterator[str]:
    start = "-"
    while entries := client.xrange(stream, start, "+", count=10_000):
        for _, fields in entries:
            yield fields["message_id"]
        start = "(" + entries[-1][0]


def stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within WAIT_S; returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            say(f"pid {proc.pid} ignored SIGTERM for {WAIT_S:g} s: killing it")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def run(args: argparse.Namespace, url: str, names: dict[str, str], record: Path) -> bool:
    env = {**os.environ, **names, "REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
    env |= {"CONSUMERS_COUNT": str(args.consumers), "MONITORING_INTERVAL": "2"}
    if args.cluster:
        env |= {"REDIS_CLUSTER": "true", "PARTITIONS": str(CLUSTER_PARTITIONS)}
        client: Any = RedisCluster.from_url(url, decode_responses=True)
    else:
        client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys.from_settings(load_status_settings([], environ=env))
    outputs = [partition.output for partition in keys.partitions]
    deads = [partition.dead for partition in keys.partitions]
    python = sys.executable
    # Sessions of their own: a Ctrl-C reaches only us, and the finally below stops them in order.
    daemon = subprocess.Popen(
        [python, str(DEMO_DIR / "consume.py")], env=env, start_new_session=True
    )
    publisher = None
    try:

        def listed() -> bool:
            return bool(client.llen(keys.consumers) == args.consumers)

        if not wait_for(f"{args.consumers} consumers to register", listed, daemon):
            return False
        say(f"{args.consumers} consumers live; publishing for {args.duration:g} s")
        publish = [python, str(DEMO_DIR / "publish.py"), "--record", str(record)]
        publish += ["--target-duration-s", str(args.duration)]
        publisher = subprocess.Popen(publish, env=env, start_new_session=True)
        if publisher.wait() != 0:
            say(f"the publisher exited with code {publisher.returncode}")
            return False
        for number, payload in enumerate(INVALID_PAYLOADS):
            channel = keys.partitions[number % len(keys.partitions)].channel
            (client.spublish if args.cluster else client.publish)(channel, payload)
        published = {line.split()[0] for line in record.read_text().splitlines()}
        expected_dead = len(INVALID_PAYLOADS)

        def all_arrived() -> bool:
            dead = sum(client.xlen(stream) for stream in deads)
            written = sum(client.xlen(stream) for stream in outputs)
            return bool(written >= len(published) and dead >= expected_dead)

        wait_for("every message to be written", all_arrived, daemon)
        say("stopping the daemon with SIGTERM")
        code = stop(daemon)
        ids = [item for stream in outputs for item in stream_ids(client, stream)]
        written = set(ids)
        dead = sum(client.xlen(stream) for stream in deads)
        left = client.llen(keys.consumers)
        checks = {
            f"published     {len(published):>8,}": bool(published),
            f"written       {len(written):>8,} (unique)": written == published,
            f"duplicates    {len(ids) - len(written):>8,}": len(ids) == len(written),
            f"missing       {len(published - written):>8,}": not published - written,
            f"dead-lettered {dead:>8,} (expected {expected_dead})": dead == expected_dead,
            f"daemon exit code {code}": code == 0,
            f"consumers list empty after shutdown: {'yes' if left == 0 else 'no'}": left == 0,
        }
        print("\n=== verification ===", flush=True)
        for line, ok in checks.items():
            print(f"  {'ok  ' if ok else 'FAIL'} {line}", flush=True)
        return all(checks.values())
    finally:
        stop(publisher)
        stop(daemon)
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds to publish for")
    parser.add_argument("--consumers", type=int, default=3, help="consumer processes")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help=f"on a throwaway Redis Cluster with {CLUSTER_PARTITIONS} partitions",
    )
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    url = None if args.cluster else configured_url()
    server: RedisServer | LocalCluster | None = None
    names = {"INPUT_CHANNEL": "messages:published", "OUTPUT_STREAM": "messages:processed"}
    names |= {"DEAD_LETTER_STREAM": "messages:dead", "CONSUMERS_LIST": "consumer:ids"}
    names["KEY_PREFIX"] = "processor"
    try:
        if args.cluster:
            say(f"starting a throwaway Redis Cluster ({find_redis_server()}, 3 x (1 + 1))")
            server = LocalCluster()
            server.start()
            url = server.url
        elif url is None:
            say(f"starting a throwaway redis-server ({find_redis_server()})")
            server = RedisServer()
            server.start()
            url = server.url
        else:
            # Never touch the user's data: every key of this run gets a suffix of its own.
            suffix = f":demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            names = {name: key + suffix for name, key in names.items()}
            say(f"using the configured Redis; this run writes to keys ending in {suffix}")
        with tempfile.TemporaryDirectory(prefix="processor-demo-") as directory:
            ok = run(args, url, names, Path(directory) / "published.txt")
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except ClusterUnavailable as error:
        say(str(error))
        return 1
    finally:
        if server is not None:
            server.stop()
            say("throwaway Redis stopped")
    say("all good" if ok else "verification FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
