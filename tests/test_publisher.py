"""The publisher against a real redis-server: honest receiver counts, the record, re-publishing."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.client import PubSub

from demo.redis_server import RedisServer, free_port
from processor.commands.publish import Publisher, PublishReport
from processor.config import PublisherSettings
from tests.conftest import Processes
from tests.helpers import wait_until

CHANNEL = "messages:published"


def _settings(redis_url: str, **overrides: object) -> PublisherSettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "target_duration_s": 0.3,
        "batch_size": 50,
        "pause_min_ms": 10,
        "pause_max_ms": 20,
        "progress_interval_s": 60.0,
    }
    values.update(overrides)
    return PublisherSettings(**values)  # type: ignore[arg-type]


def _record(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(line.split()[0], int(line.split()[1])) for line in lines]


@pytest.fixture
def subscribed(r: redis.Redis) -> Iterator[PubSub]:
    pubsub = r.pubsub()
    pubsub.subscribe(CHANNEL)
    # A whole-second timeout: under a 0 or 1 ms one, redis-py drops a partly received message
    # with the connection and re-subscribes silently (measured on this project's machine).
    confirmation = pubsub.get_message(timeout=1.0)
    assert confirmation is not None
    assert confirmation["type"] == "subscribe"
    try:
        yield pubsub
    finally:
        pubsub.close()


def _drain(pubsub: PubSub, count: int, timeout_s: float = 10.0) -> list[dict[str, object]]:
    bodies: list[dict[str, object]] = []

    def more() -> bool:
        message = pubsub.get_message(timeout=1.0)
        if message is not None and message["type"] == "message":
            bodies.append(json.loads(message["data"]))
        return len(bodies) >= count

    wait_until(more, timeout=timeout_s, interval=0)
    return bodies


def test_with_no_subscriber_every_message_is_unreceived(redis_url: str, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    report = Publisher(_settings(redis_url, record=str(record))).run()
    assert report.published >= 50
    assert report.published % 50 == 0
    assert report.unreceived == report.published
    assert report.republished == 0
    lines = _record(record)
    assert len(lines) == report.published
    assert {receivers for _, receivers in lines} == {0}
    assert len({message_id for message_id, _ in lines}) == len(lines)


def test_with_a_subscriber_every_message_is_received(
    redis_url: str, tmp_path: Path, subscribed: PubSub
) -> None:
    record = tmp_path / "record.txt"
    report = Publisher(_settings(redis_url, record=str(record))).run()
    assert report.published >= 50
    assert report.unreceived == 0
    lines = _record(record)
    assert len(lines) == report.published
    assert {receivers for _, receivers in lines} == {1}

    bodies = _drain(subscribed, report.published)
    assert [body["message_id"] for body in bodies] == [message_id for message_id, _ in lines]
    assert set(bodies[0]) == {"message_id", "published_at", "source", "text"}
    assert isinstance(bodies[0]["message_id"], str)


def test_record_file_is_appended_to(redis_url: str, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    record.write_text("earlier 1\n", encoding="utf-8")
    report = Publisher(_settings(redis_url, record=str(record))).run()
    lines = _record(record)
    assert lines[0] == ("earlier", 1)
    assert len(lines) == 1 + report.published


def test_retry_unreceived_republishes_once_someone_listens(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    settings = _settings(
        redis_url,
        record=str(record),
        retry_unreceived=True,
        target_duration_s=0.05,  # one burst
        pause_min_ms=100,
        pause_max_ms=100,
    )
    publisher = Publisher(settings)
    reports: list[PublishReport] = []
    thread = threading.Thread(target=lambda: reports.append(publisher.run()))
    thread.start()
    pubsub = r.pubsub()
    try:
        wait_until(lambda: publisher.report.published >= 50, timeout=10)
        pubsub.subscribe(CHANNEL)
        assert pubsub.get_message(timeout=1.0) is not None  # the subscribe confirmation
        bodies = _drain(pubsub, 50, timeout_s=15)
    except BaseException:
        publisher.stop.set()
        raise
    finally:
        thread.join(timeout=20)
        pubsub.close()
    assert not thread.is_alive()
    (report,) = reports
    assert report.published == 50
    assert report.unreceived == 50
    assert report.republished >= 50
    assert report.still_unreceived == 0

    lines = _record(record)
    first_ids = [message_id for message_id, _ in lines[:50]]
    assert [receivers for _, receivers in lines[:50]] == [0] * 50
    received_ids = {str(body["message_id"]) for body in bodies}
    assert received_ids == set(first_ids)  # the very messages of the first burst
    final = {message_id: receivers for message_id, receivers in lines}
    assert all(final[message_id] == 1 for message_id in first_ids)


def test_report_line() -> None:
    report = PublishReport(
        published=12_345, unreceived=3, republished=3, still_unreceived=0, elapsed_s=2.0
    )
    assert report.line() == (
        "published 12,345 messages in 2.0 s (6,172 msg/s); reached no subscriber: 3"
        " (re-published 3, still unreceived 0)"
    )


def test_steady_rate_does_not_overshoot(redis_url: str) -> None:
    report = Publisher(_settings(redis_url, rate=500, batch_size=25, target_duration_s=0.5)).run()
    # 0.5 s at 500 msg/s is 250 messages; bursts every 50 ms, so never far above that.
    assert 25 <= report.published <= 300


def test_publish_script_prints_the_final_line(procs: Processes, redis_url: str) -> None:
    proc = procs.start(
        [
            "demo/publish.py",
            "--target-duration-s",
            "0.3",
            "--batch-size",
            "20",
            "--pause-min-ms",
            "10",
            "--pause-max-ms",
            "20",
        ],
        env={"REDIS_URL": redis_url},
    )
    assert proc.wait(timeout=30) == 0
    output = procs.output(proc)
    match = re.search(
        r"published ([\d,]+) messages in [\d.]+ s \([\d,]+ msg/s\); "
        r"reached no subscriber: ([\d,]+)",
        output,
    )
    assert match, output
    assert match.group(1) == match.group(2)  # nobody was listening
    assert int(match.group(1).replace(",", "")) >= 20


# A publisher stops at TARGET_DURATION whatever Redis does: a retry already under way (a refused
# connection, a refused password) ends within a few seconds of it.
STOPS_WITHIN_S = 15


def _publish_for_2_s(procs: Processes, url: str) -> tuple[int, str]:
    """Runs ``demo/publish.py --target-duration-s 2``; its exit code and output."""
    proc = procs.start(["demo/publish.py", "--target-duration-s", "2"], env={"REDIS_URL": url})
    code = proc.wait(timeout=STOPS_WITHIN_S)
    return code, procs.output(proc)


def test_the_publisher_stops_at_its_duration_when_redis_is_unreachable(procs: Processes) -> None:
    port = free_port()  # nothing listens there
    code, output = _publish_for_2_s(procs, f"redis://127.0.0.1:{port}/0")
    assert code == 1, output  # published nothing
    assert re.search(
        r"\[publisher\] stopped with Redis unavailable for [\d.]+ s \(\d+ failed attempts; the "
        rf"last: Error 111 connecting to 127\.0\.0\.1:{port}\. Connection refused\): messages "
        r"due meanwhile were not published",
        output,
    ), output
    assert "published 0 messages in " in output


def test_the_publisher_stops_at_its_duration_when_redis_refuses_its_password(
    procs: Processes,
) -> None:
    server = RedisServer(extra_config={"requirepass": "right"})
    server.start()
    try:
        code, output = _publish_for_2_s(procs, f"redis://:wrong@127.0.0.1:{server.port}/0")
    finally:
        server.stop()
    assert code == 1, output
    assert "refused our credentials" in output
    assert "[publisher] stopped with Redis unavailable for " in output


def test_a_publisher_whose_redis_goes_down_mid_run_stops_at_its_duration(
    procs: Processes, private_redis: RedisServer, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    proc = procs.start(
        ["demo/publish.py", "--target-duration-s", "4", "--record", str(record)],
        env={"REDIS_URL": private_redis.url},
    )
    wait_until(lambda: record.exists() and record.stat().st_size > 0, timeout=10)
    private_redis.stop()
    assert proc.wait(timeout=STOPS_WITHIN_S) == 0  # it published some: its line counts them
    output = procs.output(proc)
    assert "[publisher] stopped with Redis unavailable for " in output, output
    assert re.search(r"published [1-9][\d,]* messages in ", output), output
