"""Support for the fault-injection suite: the daemon and publisher as processes, and the checks.

The daemon runs as ``demo/consume.py`` and the publisher as ``demo/publish.py --record FILE``,
both through the ``procs`` fixture. The checks compare what the publisher recorded (one line
``message_id receivers`` per PUBLISH) with what is in the output and dead-letter streams.

This module is also imported by consumer processes (``HANDLER=tests.faults_support:faulty``),
so it imports nothing heavy and nothing from pytest.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tests import handlers_for_tests
from tests.helpers import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent

CHANNEL = "messages:published"
OUTPUT = "messages:processed"
DEAD = "messages:dead"
CONSUMERS = "consumer:ids"
GAPS = "processor:gaps"

# The daemon's default READERS_PER_HOST: the consumers in slots 0 and 1 subscribe and feed the
# others (partitioned); they hold the copies that a takeover needs.
READERS = 2
HEARTBEAT_INTERVAL_MS = 200
HEARTBEAT_TTL_MS = 1000
# Fast settings: a dead consumer is noticed in about a second, a crash is replaced at once.
FAST_SETTINGS = {
    "HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_INTERVAL_MS),
    "HEARTBEAT_TTL_MS": str(HEARTBEAT_TTL_MS),
    "TAKEOVER_BUFFER_MS": "4000",
    "DEDUP_WINDOW_MS": "60000",
    "RESTART_BACKOFF_MAX": "1",
    "RECONNECT_BACKOFF_MAX": "0.5",
    "MONITORING_INTERVAL": "1",
    "SHUTDOWN_GRACE": "5",
    "LOGLEVEL": "INFO",
    # The fed consumers own their lanes, as with a slow handler: their hop is what the fault
    # tests prove; tests/test_spread.py runs the default, where they stand by for a cheap one.
    "SPREAD": "always",
}
# Steady publish rate: thousands per second, with room to spare on 2 shared cores.
RATE = 3000
# How long a dead id may stay listed: its heartbeat TTL, one beat of a live consumer to prune
# it, and a margin for a loaded machine.
LINGER_MARGIN_S = 2.0
LINGER_S = (HEARTBEAT_TTL_MS + HEARTBEAT_INTERVAL_MS) / 1000 + LINGER_MARGIN_S
# Generous deadlines: the machine is shared, and a healthy run meets them in a fraction.
START_S = 30.0
SETTLE_S = 30.0
QUIET_S = 5.0
RECOVER_S = 15.0
# A crashed consumer is replaced "within a second or two": this leaves room for a loaded machine.
REPLACE_S = 10.0

# Invalid payloads mixed into every run, with a fragment of the reason each must get.
INVALID_PAYLOADS: dict[bytes, str] = {
    b"not json at all": "invalid JSON",
    b'{"text": "no message_id"}': "missing message_id",
    b"[1, 2, 3]": "not a JSON object",
    b'{"message_id": 7}': "message_id is not a string",
    b'{"message_id": "\xff\xfe"}': "invalid UTF-8",
}


# -- a handler for consumer processes ----------------------------------------------------------


def faulty(message: dict[str, Any]) -> Any:
    """Echoes a message, unless its ``fault`` field asks for one of the shared test handlers."""
    fault = message.get("fault")
    if fault == "raise":
        return handlers_for_tests.raises(message)
    if fault == "hang":
        return handlers_for_tests.sleeps_forever(message)
    if fault == "not_a_dict":
        return handlers_for_tests.returns_non_dict(message)
    if fault == "slow":
        return handlers_for_tests.slow_100ms(message)
    return message


# -- processes ---------------------------------------------------------------------------------


def client(url: str) -> redis.Redis:
    """A bytes client that rides out a Redis restart or a CLIENT KILL."""
    return redis.Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _proc_children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(
                int(child)
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            )
        except OSError:
            continue
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def exists(pid: int) -> bool:
    """True while ``pid`` has a /proc entry: running, or a zombie nobody has reaped yet."""
    return os.path.exists(f"/proc/{pid}")


def _is_consumer(pid: int) -> bool:
    # multiprocessing also forks a resource tracker; consumers run spawn_main until their
    # entry point gives them their title.
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in command or command.startswith(b"processor: consumer ")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def group_members(pgid: int) -> list[str]:
    """Every process still in a process group, as ``pid state ppid command`` (for failures)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
            command = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(
                f"{name} {fields[0]} ppid={fields[1]} {command[:80].decode(errors='replace')}"
            )
    return found


def pid_of(consumer_id: str) -> int:
    """Consumer ids are ``<host>-<pid>-<slot>-<random>`` (the host may contain dashes)."""
    return int(consumer_id.rsplit("-", 3)[1])


class Daemon:
    """A running ``demo/consume.py`` and what can be seen of it from outside."""

    def __init__(self, procs: Any, proc: Any, url: str, count: int) -> None:
        self.procs = procs
        self.proc = proc
        self.count = count
        self.redis = client(url)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def log(self) -> str:
        return str(self.procs.output(self.proc))

    def consumers(self) -> set[int]:
        """Pids of the running consumer processes (children of the supervisor)."""
        return {pid for pid in _proc_children(self.pid) if _is_consumer(pid) and running(pid)}

    def listed(self) -> list[str]:
        return [item.decode() for item in self.redis.lrange(CONSUMERS, 0, -1)]

    def ids(self) -> dict[int, str]:
        """Listed consumer ids by pid."""
        return {pid_of(consumer_id): consumer_id for consumer_id in self.listed()}

    def in_step(self) -> bool:
        """CONSUMERS_LIST holds exactly the running consumers, one id each, and all of them."""
        listed = sorted(pid_of(consumer_id) for consumer_id in self.listed())
        live = sorted(self.consumers())
        return len(live) == self.count and listed == live

    def wait_in_step(self, timeout: float, why: str) -> dict[int, str]:
        wait_until(
            self.in_step,
            timeout,
            message=lambda: (
                f"{why}: CONSUMERS_LIST {self.listed()} != running consumers "
                f"{sorted(self.consumers())} (want {self.count}) within {timeout:g} s"
            ),
        )
        return self.ids()

    def close(self) -> None:
        self.redis.close()

    def stop(self, why: str) -> None:
        """SIGTERM: exit 0, every consumer gone, list emptied, and nothing left in the group."""
        try:
            self._stop(why)
        finally:
            self.close()

    def _stop(self, why: str) -> None:
        consumers = self.consumers()
        assert consumers, f"{why}: no consumer running before SIGTERM"
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        assert code == 0, f"{why}: daemon exited with {code} after SIGTERM"
        alive = [pid for pid in consumers if running(pid)]
        assert not alive, f"{why}: consumers {alive} still running after the daemon exited"
        assert self.redis.llen(CONSUMERS) == 0, f"{why}: {self.listed()} still listed after SIGTERM"
        # multiprocessing's resource tracker outlives the supervisor briefly, orphaned to init,
        # which reaps it within a couple of seconds here: give it that time.
        if not wait_for_result(lambda: not group_alive(self.pid), timeout=15):
            raise AssertionError(
                f"{why}: process group {self.pid} still has members 15 s after SIGTERM: "
                f"{group_members(self.pid)}"
            )


def daemon_env(url: str, strategy: str, count: int, overrides: dict[str, object]) -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **FAST_SETTINGS,
        "REDIS_URL": url,
        "STRATEGY": strategy,
        "CONSUMERS_COUNT": str(count),
        "PYTHONPATH": python_path,
    }
    env.update({name: str(value) for name, value in overrides.items()})
    return env


def start_daemon(
    procs: Any, url: str, strategy: str, count: int = 3, **overrides: object
) -> Daemon:
    """Starts the daemon and returns once every consumer is listed."""
    proc = procs.start(["demo/consume.py"], env=daemon_env(url, strategy, count, overrides))
    daemon = Daemon(procs, proc, url, count)

    def ready() -> bool:
        assert proc.poll() is None, f"daemon exited with {proc.returncode}:\n{daemon.log()}"
        return daemon.in_step()

    wait_until(ready, START_S, message=f"{count} consumers not listed within {START_S:g} s")
    return daemon


class Publisher:
    """A running ``demo/publish.py --rate`` and the record it writes."""

    def __init__(self, procs: Any, proc: Any, record: Path) -> None:
        self.procs = procs
        self.proc = proc
        self.record = record
        self._lines = 0
        self._offset = 0

    def published(self) -> int:
        """Messages recorded so far (complete lines only)."""
        try:
            with open(self.record, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return 0
        complete = chunk.rfind(b"\n") + 1
        self._lines += chunk.count(b"\n", 0, complete)
        self._offset += complete
        return self._lines

    def wait_published(self, count: int, timeout: float = 30) -> None:
        def reached() -> bool:
            if self.published() >= count:
                return True
            assert self.proc.poll() is None, f"publisher exited before {count} messages"
            return False

        wait_until(reached, timeout, interval=0.01, message=f"{count} messages not published")

    def finish(self, timeout: float = 60) -> str:
        """Waits for the publisher to end; returns its summary line."""
        code = self.proc.wait(timeout=timeout)
        output = str(self.procs.output(self.proc))
        assert code == 0, f"publisher exited with {code}:\n{output[-2000:]}"
        return next(
            (line for line in output.splitlines() if line.startswith("published ")), output[-500:]
        )

    def records(self) -> list[tuple[str, int]]:
        rows = []
        for line in self.record.read_text().splitlines():
            message_id, receivers = line.split()
            rows.append((message_id, int(receivers)))
        return rows


def start_publisher(
    procs: Any, url: str, record: Path, duration_s: float, rate: int = RATE
) -> Publisher:
    args = ["demo/publish.py", "--rate", str(rate), "--target-duration-s", str(duration_s)]
    args += ["--record", str(record), "--batch-size", "50", "--progress-interval-s", "1"]
    proc = procs.start(args, env={"REDIS_URL": url, "LOGLEVEL": "INFO"})
    return Publisher(procs, proc, record)


# -- faults ------------------------------------------------------------------------------------


def subscriber_connections(redis_client: redis.Redis) -> list[dict[str, Any]]:
    return [
        entry
        for entry in redis_client.client_list(_type="pubsub")
        if entry.get("name") == "processor-subscriber"
    ]


def slot_of(consumer_id: str) -> int:
    return int(consumer_id.rsplit("-", 2)[1])


def holds_copies(consumer_id: str, strategy: str) -> bool:
    """A reader (partitioned), or any consumer (race: every consumer subscribes)."""
    return strategy == "race" or slot_of(consumer_id) < READERS


class Veterans:
    """The promise under kills: nothing is lost while one consumer holding copies (any with
    race, a reader with partitioned) lives throughout; a replacement holds only what was
    published after it subscribed. So a test kills a holder only while another has been listed
    for a second."""

    def __init__(self, daemon: Daemon, strategy: str) -> None:
        self._daemon = daemon
        self._strategy = strategy
        self._listed_since: dict[str, float] = {}

    def holders(self) -> set[int]:
        """Pids of the holders of copies listed for at least a second."""
        now = time.monotonic()
        ids = self._daemon.ids()
        for consumer_id in ids.values():
            self._listed_since.setdefault(consumer_id, now)
        return {
            pid
            for pid, cid in ids.items()
            if now - self._listed_since[cid] >= 1.0 and holds_copies(cid, self._strategy)
        }

    def may_kill(self, victim: int) -> bool:
        return bool(self.holders() - {victim})


def subscribers(redis_client: redis.Redis) -> int:
    reply: Any = redis_client.pubsub_numsub(CHANNEL)
    return int(reply[0][1])


def command_connections(redis_client: redis.Redis) -> Counter[str]:
    return Counter(str(entry.get("name")) for entry in redis_client.client_list(_type="normal"))


def publish_invalid(redis_client: redis.Redis, why: str) -> None:
    """Publishes the invalid payloads; each must reach a subscriber to count."""
    for payload in INVALID_PAYLOADS:
        receivers = redis_client.publish(CHANNEL, payload)
        assert receivers >= 1, f"{why}: invalid payload {payload!r} reached no subscriber"


def fault_message(fault: str, number: int, seed: int) -> tuple[str, bytes]:
    message_id = f"fault-{fault}-{number}-{seed}"
    body = {"message_id": message_id, "fault": fault, "source": "test_faults"}
    return message_id, json.dumps(body).encode()


# -- checks ------------------------------------------------------------------------------------


def read_entries(redis_client: redis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    found: list[tuple[bytes, dict[bytes, bytes]]] = []
    start = "-"
    while entries := redis_client.xrange(stream, start, "+", count=10_000):
        found.extend(entries)
        start = "(" + entries[-1][0].decode()
    return found


def read_stream(redis_client: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in read_entries(redis_client, stream)]


def written_ids(redis_client: redis.Redis) -> Counter[str]:
    return Counter(entry[b"message_id"].decode() for entry in read_stream(redis_client, OUTPUT))


def describe_writes(redis_client: redis.Redis, message_ids: Iterable[str]) -> str:
    """When and by whom each message was written, relative to its publication (for failures)."""
    wanted = set(message_ids)
    writes: dict[str, list[str]] = {message_id: [] for message_id in wanted}
    published: dict[str, float] = {}
    for entry_id, fields in read_entries(redis_client, OUTPUT):
        message_id = fields[b"message_id"].decode()
        if message_id in wanted:
            written_ms = int(entry_id.split(b"-")[0])
            published_at = json.loads(fields[b"data"]).get("published_at", written_ms / 1000)
            published[message_id] = published_at
            writes[message_id].append(
                f"+{written_ms / 1000 - published_at:.2f}s by {fields[b'consumer_id'].decode()}"
            )
    return "; ".join(
        f"{message_id} published {published.get(message_id, 0):.3f}: {', '.join(found)}"
        for message_id, found in sorted(writes.items())
    )


@dataclass
class Expected:
    """What the streams must hold at the end of a run."""

    records: list[tuple[str, int]]
    # Valid messages that must be dead-lettered instead of written, with a reason fragment.
    dead_valid: dict[str, str] = field(default_factory=dict)
    # Extra valid messages published by the test (not by the publisher) that must be written.
    extra_written: set[str] = field(default_factory=set)
    invalid: dict[bytes, str] = field(default_factory=lambda: dict(INVALID_PAYLOADS))
    # False when a retried PUBLISH may have reached subscribers before the recorded attempt
    # (a Redis restart): an id written but recorded with 0 receivers is then not an error.
    strict_unknown: bool = True
    # Ids that may be written, at most once, but need not be (a daemon killed outright).
    optional: set[str] = field(default_factory=set)

    @property
    def received(self) -> set[str]:
        """Ids recorded with at least one receiver: each must be written exactly once."""
        return {message_id for message_id, receivers in self.records if receivers >= 1}

    @property
    def to_write(self) -> set[str]:
        return (self.received - self.dead_valid.keys()) | self.extra_written

    def unreceived(self) -> int:
        return len({message_id for message_id, _ in self.records} - self.received)


def settle(redis_client: redis.Redis, expected: Expected, timeout: float = SETTLE_S) -> bool:
    """Waits until the output and dead-letter streams hold at least what is expected.

    Gives up at the deadline, or once neither stream has grown for QUIET_S (a takeover comes
    within about a second of its cause), and returns False instead of raising, so the caller
    can report precisely what is missing.
    """
    want_written = len(expected.to_write)
    want_dead = len(expected.invalid) + len(expected.dead_valid)
    deadline = time.monotonic() + timeout
    last: tuple[int, int] | None = None
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        lengths = (redis_client.xlen(OUTPUT), redis_client.xlen(DEAD))
        enough = lengths[0] >= want_written and lengths[1] >= want_dead
        if enough and expected.to_write <= written_ids(redis_client).keys():
            return True
        if lengths != last:
            last, quiet_since = lengths, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            return False
        time.sleep(0.1)
    return False


def _sample(items: Iterable[str], limit: int = 5) -> list[str]:
    return sorted(items)[:limit]


def check_streams(redis_client: redis.Redis, expected: Expected, context: str) -> str:
    """Asserts exactly once for every expected message and every dead letter; returns a summary."""
    written = written_ids(redis_client)
    to_write = expected.to_write
    duplicates = {message_id: n for message_id, n in written.items() if n > 1}
    missing = to_write - written.keys()
    recorded = {message_id for message_id, _ in expected.records} | expected.extra_written
    unknown = written.keys() - recorded - expected.dead_valid.keys() - expected.optional
    unexpected = set()
    if expected.strict_unknown:
        unexpected = (written.keys() - to_write - expected.optional) & recorded
    position = {message_id: index for index, (message_id, _) in enumerate(expected.records)}
    summary = (
        f"published={len(expected.records)} received={len(expected.received)} "
        f"unreceived={expected.unreceived()} written={sum(written.values())} "
        f"unique={len(written)} missing={len(missing)} duplicates={len(duplicates)}"
    )
    detail = f"{context}: {summary}"
    assert not missing, f"{detail}; missing e.g. " + ", ".join(
        f"{m} (record line {position.get(m)})" for m in _sample(missing)
    )
    assert not duplicates, (
        f"{detail}; duplicated e.g. {describe_writes(redis_client, _sample(duplicates, 3))}"
    )
    assert not unknown, f"{detail}; written but never published: {_sample(unknown)}"
    assert not unexpected, f"{detail}; written but recorded with 0 receivers: {_sample(unexpected)}"

    dead = read_stream(redis_client, DEAD)
    dead_raw = Counter(entry[b"raw"] for entry in dead)
    reasons = {entry[b"raw"]: entry[b"reason"].decode() for entry in dead}
    for payload, fragment in expected.invalid.items():
        assert dead_raw[payload] == 1, (
            f"{context}: invalid payload {payload!r} dead-lettered {dead_raw[payload]} times"
        )
        assert fragment in reasons[payload], f"{context}: {payload!r} reason {reasons[payload]!r}"
    dead_ids: Counter[str] = Counter()
    for entry in dead:
        if entry[b"raw"] in expected.invalid:
            continue
        message_id = json.loads(entry[b"raw"])["message_id"]
        dead_ids[message_id] += 1
        fragment = expected.dead_valid.get(message_id)
        assert fragment is not None, f"{context}: {message_id} dead-lettered: {entry!r}"
        assert fragment in entry[b"reason"].decode(), f"{context}: {message_id}: {entry!r}"
    for message_id in expected.dead_valid:
        assert dead_ids[message_id] == 1, (
            f"{context}: {message_id} dead-lettered {dead_ids[message_id]} times, want once"
        )
    return summary


def check_published(
    redis_url: str, publisher: Publisher, why: str, invalid: dict[bytes, str] | None = None
) -> str:
    """Waits for the publisher to end, then for the streams to hold exactly what it published
    (and the ``invalid`` payloads as dead letters, all of INVALID_PAYLOADS by default)."""
    publisher.finish()
    redis_client = client(redis_url)
    try:
        expected = Expected(publisher.records())
        if invalid is not None:
            expected.invalid = invalid
        assert settle(redis_client, expected), check_streams(redis_client, expected, why)
        return check_streams(redis_client, expected, why)
    finally:
        redis_client.close()


def wait_for_result(predicate: Callable[[], object], timeout: float) -> bool:
    """Polls like wait_until, but returns False at the deadline instead of raising."""
    try:
        wait_until(predicate, timeout)
    except AssertionError:
        return False
    return True


def wait_for(predicate: Callable[[], object], timeout: float, message: str) -> float:
    """wait_until, returning how long the wait took."""
    started = time.monotonic()
    wait_until(predicate, timeout, message=message)
    return time.monotonic() - started


def finish(daemon: Daemon, redis_client: redis.Redis, expected: Expected, context: str) -> None:
    """The checks every fault test ends with, while the daemon runs and after SIGTERM."""
    settled = settle(redis_client, expected)
    summary = check_streams(redis_client, expected, context)
    assert settled, f"{context}: streams did not settle ({summary})"
    daemon.wait_in_step(LINGER_S, context)
    daemon.stop(context)
    # The graceful stop flushes what was received: still nothing doubled or unexpected.
    print(f"{context}: {check_streams(redis_client, expected, context + ' after SIGTERM')}")
