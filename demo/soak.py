"""A soak: the daemon at a steady rate for minutes, with kills and dropped connections, checked.

Starts a throwaway redis-server, the daemon (3 consumers) and the publisher at ``--rate``;
SIGKILLs a random consumer every 20-40 s and drops a random subscriber connection every 30-60 s.
Acting as the downstream reader, it reads the output and dead-letter streams as they grow,
compares them with what the publisher recorded, and trims what it has read (as a consumer group
would after XACK), so Redis's memory is the daemon's own: locks for the dedup window, the group's
keys. Every minute it prints written, lost and duplicated so far, the RSS of every process,
Redis's used_memory and the takeover buffers. ``python demo/soak.py --help``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.redis_server import RedisServer, exit_cleanly_on_sigterm

DEMO_DIR = Path(__file__).resolve().parent
OUTPUT = "messages:processed"
DEAD = "messages:dead"
# A message not written this long after it was published counts as lost (takeovers take < 3 s).
LOST_AFTER_S = 15.0
BUFFERED = re.compile(r"buffered=([\d,]+)")


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def consumer_pids(supervisor: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            # Until its entry point titles it, a consumer shows multiprocessing's spawn_main.
            if b"spawn_main" in command or command.startswith(b"processor: consumer "):
                pids.append(int(child))
    return sorted(pids)


class Tally:
    """Published (from the record file) against written (read from the streams, then trimmed)."""

    def __init__(self, client: redis.Redis, record: Path) -> None:
        self._client = client
        self._record = record
        self._offset = 0
        self._last = {OUTPUT: "0-0", DEAD: "0-0"}
        self.pending: dict[str, float] = {}  # published, received, not yet written: when seen
        self.written: set[str] = set()
        self.published = 0
        self.unreceived = 0
        self.duplicates = 0
        self.dead = 0

    def update(self) -> None:
        self._read_record()
        for stream in (OUTPUT, DEAD):
            self._read_stream(stream)

    def lost(self, older_than_s: float) -> int:
        cutoff = time.monotonic() - older_than_s
        return sum(1 for seen in self.pending.values() if seen < cutoff)

    def _read_record(self) -> None:
        with open(self._record, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        now = time.monotonic()
        for line in chunk[:complete].decode().splitlines():
            message_id, receivers = line.split()
            self.published += 1
            if int(receivers) == 0:
                self.unreceived += 1
            elif message_id not in self.written:
                self.pending[message_id] = now

    def _read_stream(self, stream: str) -> None:
        while True:
            reply = self._client.xread({stream: self._last[stream]}, count=10_000)
            if not reply:
                return
            entries = reply[0][1]
            for _, fields in entries:
                if stream == DEAD:
                    self.dead += 1
                    continue
                self._written(fields[b"message_id"].decode())
            self._last[stream] = entries[-1][0].decode()
            # Read, so trimmed: what a downstream consumer group does after XACK.
            self._client.xtrim(stream, minid=self._last[stream])
            self._client.xdel(stream, self._last[stream])

    def _written(self, message_id: str) -> None:
        if message_id in self.written:
            self.duplicates += 1
            return
        self.written.add(message_id)
        self.pending.pop(message_id, None)


def fmt(values: Iterable[float | None]) -> str:
    return "/".join("-" if value is None else f"{value:.0f}" for value in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to publish")
    parser.add_argument("--rate", type=int, default=2000, help="messages per second")
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--dedup-window-ms", type=int, default=60_000, help="the dedup window")
    parser.add_argument("--strategy", default="partitioned", choices=["partitioned", "race"])
    parser.add_argument("--report-s", type=float, default=60.0, help="seconds between lines")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    seed = args.seed if args.seed is not None else random.randrange(10**9)
    rng = random.Random(seed)
    duration_s = args.minutes * 60
    print(
        f"soak: {args.minutes:g} min at {args.rate:,} msg/s, {args.consumers} consumers "
        f"({args.strategy}), DEDUP_WINDOW_MS={args.dedup_window_ms}, seed {seed}",
        flush=True,
    )
    server = RedisServer()
    server.start()
    workdir = Path(tempfile.mkdtemp(prefix="processor-soak-"))
    record = workdir / "published.txt"
    record.touch()
    env = {**os.environ, "REDIS_URL": server.url, "PYTHONUNBUFFERED": "1"}
    env |= {
        "CONSUMERS_COUNT": str(args.consumers),
        "STRATEGY": args.strategy,
        "DEDUP_WINDOW_MS": str(args.dedup_window_ms),
        "MONITORING_INTERVAL": "5",
    }
    log_path = workdir / "daemon.log"
    python = sys.executable
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [python, str(DEMO_DIR / "consume.py")],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = redis.Redis.from_url(server.url)
    publisher: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while client.llen("consumer:ids") < args.consumers:
            if time.monotonic() > deadline or daemon.poll() is not None:
                print(log_path.read_text()[-3000:])
                return 1
            time.sleep(0.1)
        publish = [python, str(DEMO_DIR / "publish.py"), "--record", str(record)]
        publish += ["--rate", str(args.rate), "--target-duration-s", str(duration_s)]
        publish += ["--progress-interval-s", "60"]
        publisher = subprocess.Popen(
            publish,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        tally = Tally(client, record)
        started = time.monotonic()
        next_kill = started + rng.uniform(20, 40)
        next_drop = started + rng.uniform(30, 60)
        next_report = started + args.report_s
        kills = drops = 0
        print(
            "soak:   min  published   written  lost  dup  dead | RSS MiB: supervisor consumers "
            "publisher redis | redis used_memory MiB | buffered",
            flush=True,
        )
        while publisher.poll() is None:
            now = time.monotonic()
            if now >= next_kill:
                pids = consumer_pids(daemon.pid)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                next_kill = now + rng.uniform(20, 40)
            if now >= next_drop:
                subscribers = [
                    entry
                    for entry in client.client_list(_type="pubsub")
                    if entry.get("name") == "processor-subscriber"
                ]
                if subscribers:
                    client.client_kill_filter(_id=rng.choice(subscribers)["id"])
                    drops += 1
                next_drop = now + rng.uniform(30, 60)
            tally.update()
            if now >= next_report:
                next_report += args.report_s
                report(tally, daemon.pid, publisher.pid, server.pid, client, log_path, started)
            time.sleep(0.5)
        # Settle: everything received is written within seconds.
        settle_until = time.monotonic() + LOST_AFTER_S
        while tally.pending and time.monotonic() < settle_until:
            tally.update()
            time.sleep(0.5)
        report(tally, daemon.pid, publisher.pid, server.pid, client, log_path, started)
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        tally.update()
        lost = len(tally.pending)
        print(
            f"soak: done: published={tally.published:,} unreceived={tally.unreceived} "
            f"written={len(tally.written):,} lost={lost} duplicated={tally.duplicates} "
            f"dead={tally.dead} kills={kills} connection drops={drops} daemon exit={code} "
            f"(log: {log_path})",
            flush=True,
        )
        return 0 if lost == 0 and tally.duplicates == 0 and code == 0 else 1
    finally:
        for proc in (publisher, daemon):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        client.close()
        server.stop()


def report(
    tally: Tally,
    supervisor: int,
    publisher: int,
    redis_pid: int,
    client: redis.Redis,
    log_path: Path,
    started: float,
) -> None:
    memory = client.info("memory")["used_memory"] / 2**20
    consumers = [rss_mib(pid) for pid in consumer_pids(supervisor)]
    lines = [line for line in log_path.read_text().splitlines() if "throughput" in line]
    buffered = BUFFERED.findall(lines[-1]) if lines else []
    print(
        f"soak: {(time.monotonic() - started) / 60:5.1f} {tally.published:>10,} "
        f"{len(tally.written):>9,} {tally.lost(LOST_AFTER_S):>5} {tally.duplicates:>4} "
        f"{tally.dead:>5} | {fmt([rss_mib(supervisor)])} {fmt(consumers)} "
        f"{fmt([rss_mib(publisher)])} {fmt([rss_mib(redis_pid)])} | {memory:.1f} | "
        f"{'/'.join(buffered) or '0'}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
