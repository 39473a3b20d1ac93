"""Autoscale, measured: a CPU-bound handler, a load that steps up and down, the group following it.

``python demo/autoscale_run.py [--steps 2000:20,10000:30,2000:40]``. Starts a throwaway
redis-server and the daemon with the ``cpu_100us`` handler (100 µs of CPU per message),
``AUTOSCALE=1:4`` and one consumer, then publishes each step (rate:seconds) in turn. Every
second it prints the offered rate, the written rate, the group's size and desired size; at the
end it compares what was published with the output stream (lost, doubled) and prints every
autoscale decision the daemon logged.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.redis_server import RedisServer, exit_cleanly_on_sigterm

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = "messages:processed"
CONSUMERS = "consumer:ids"
SETTLE_S = 20.0
DAEMON_SETTINGS = {
    "HANDLER": "demo.bench_handlers:cpu_100us",
    "CONSUMERS_COUNT": "1",
    "AUTOSCALE": "1:4",
    "AUTOSCALE_INTERVAL": "2",
    "AUTOSCALE_COOLDOWN": "6",
    "MAX_CONSUMERS": "4",
    "MONITORING_INTERVAL": "3600",
    "LOGLEVEL": "INFO",
}


def steps_of(text: str) -> list[tuple[int, float]]:
    steps = []
    for part in text.split(","):
        rate, _, seconds = part.partition(":")
        steps.append((int(rate), float(seconds)))
    return steps


def publish(url: str, rate: int, seconds: float, record: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(ROOT / "demo" / "publish.py"), "--rate", str(rate)]
    args += ["--target-duration-s", str(seconds), "--record", str(record)]
    args += ["--progress-interval-s", "3600"]
    env = {**os.environ, "REDIS_URL": url, "LOGLEVEL": "WARNING"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sample(client: redis.Redis) -> tuple[int, int, str]:
    pipe = client.pipeline(transaction=False)
    pipe.xlen(OUTPUT)
    pipe.llen(CONSUMERS)
    pipe.hget("processor:control", "desired")
    written, size, desired = pipe.execute()
    return int(written), int(size), desired.decode() if desired else "-"


def check(client: redis.Redis, records: list[Path]) -> tuple[int, int, int, int]:
    """Published, received, lost (received, never written) and doubled (written twice)."""
    received, published = set(), 0
    for record in records:
        for line in record.read_text().splitlines():
            message_id, receivers = line.split()
            published += 1
            if int(receivers) > 0:
                received.add(message_id)
    counts: dict[str, int] = {}
    last = "-"
    while True:
        page = client.xrange(OUTPUT, f"({last}" if last != "-" else "-", "+", count=10_000)
        if not page:
            break
        for _, fields in page:
            message_id = fields[b"message_id"].decode()
            counts[message_id] = counts.get(message_id, 0) + 1
        last = page[-1][0].decode()
    doubled = sum(1 for n in counts.values() if n > 1)
    return published, len(received), len(received - counts.keys()), doubled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="2000:20,10000:30,2000:40", help="rate:seconds,...")
    args = parser.parse_args()
    steps = steps_of(args.steps)
    exit_cleanly_on_sigterm()
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        client = redis.Redis.from_url(server.url)
        log_path = Path(tmp) / "daemon.log"
        env = {**os.environ, **DAEMON_SETTINGS, "REDIS_URL": server.url, "PYTHONPATH": str(ROOT)}
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, str(ROOT / "demo" / "consume.py")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            while client.llen(CONSUMERS) < 1:
                time.sleep(0.1)
            print(f"{'t':>4}  {'offered/s':>9}  {'written/s':>9}  {'consumers':>9}  desired")
            records, started = [], time.monotonic()
            last_written, last_t = 0, started
            for number, (rate, seconds) in enumerate(steps):
                records.append(Path(tmp) / f"record-{number}.txt")
                publisher = publish(server.url, rate, seconds, records[-1])
                while publisher.poll() is None:
                    time.sleep(1.0)
                    now = time.monotonic()
                    written, size, desired = sample(client)
                    speed = (written - last_written) / (now - last_t)
                    last_written, last_t = written, now
                    print(
                        f"{now - started:4.0f}  {rate:>9,}  {speed:>9,.0f}  {size:>9}  {desired}",
                        flush=True,
                    )
            deadline = time.monotonic() + SETTLE_S
            while time.monotonic() < deadline and client.xlen(OUTPUT) > last_written:
                last_written = client.xlen(OUTPUT)
                time.sleep(1.0)
            published, received, lost, doubled = check(client, records)
            print(
                f"\npublished {published:,}, received {received:,}, lost {lost:,}, "
                f"doubled {doubled:,}"
            )
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=60)
            client.close()
        decisions = re.findall(r"autoscale \(host .*", log_path.read_text())
        print("\nautoscale decisions:\n" + "\n".join(decisions))
    return 0 if lost == 0 and doubled == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
