"""The metrics endpoint end to end: the daemon with METRICS_PORT, scraped over HTTP."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from demo.redis_server import RedisServer, free_port
from processor.consumer.messages import REASON_CODES
from processor.observe.metrics import CONNECTIONS
from processor.observe.processes import usage
from processor.version import version
from tests.faults_support import (
    CHANNEL,
    HEARTBEAT_TTL_MS,
    OUTPUT,
    client,
    start_daemon,
    start_publisher,
)
from tests.helpers import wait_until

INVALID = {b"not json": "invalid_json", b'{"x": 1}': "missing_message_id", b"[1]": "not_an_object"}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[str, float]:
    """Every sample as 'name{label="value"}' -> value."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(
                f'{key}="{value}"' for key, value in sorted(sample.labels.items()) if key != "pid"
            )
            name = f"{sample.name}{{{labels}}}" if labels else sample.name
            samples[name] = samples.get(name, 0.0) + sample.value
    return samples


def receiving(port: int) -> dict[int, float]:
    """processor_consumer_receiving by consumer pid."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {
        int(sample.labels["pid"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "processor_consumer_receiving"
    }


def test_metrics_count_what_was_published_and_the_probes_follow_the_group(
    procs, redis_url, tmp_path: Path
):
    port = free_port()
    daemon = start_daemon(procs, redis_url, "partitioned", count=2, METRICS_PORT=port)
    redis_client = client(redis_url)
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 20, message="never ready")
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/nope")[0] == 404
        for payload in INVALID:
            assert redis_client.publish(CHANNEL, payload) == 2
        publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 1.0, rate=500)
        publisher.finish()
        published = len(publisher.records())
        wait_until(lambda: redis_client.xlen(OUTPUT) >= published, 20, message="not written")

        def counted() -> bool:
            samples = scrape(port)
            # Both consumers are readers (READERS_PER_HOST=2): each reads every message.
            received = samples.get('processor_messages_received_total{role="reader"}')
            return samples.get(
                "processor_messages_written_total"
            ) == published and received == 2 * (published + 3)

        wait_until(counted, 20, message=lambda: f"counters never matched: {scrape(port)}")
        samples = scrape(port)
        for kind in INVALID.values():
            assert samples[f'processor_messages_dead_lettered_total{{reason="{kind}"}}'] == 1
        assert samples["processor_consumers_live"] == 2
        assert samples["processor_consumers_target"] == 2
        assert samples["processor_batch_size_messages_count"] >= 1
        # Every entry sent to the script was written, dead-lettered or skipped as written.
        dead = sum(v for k, v in samples.items() if k.startswith("processor_messages_dead_"))
        assert samples["processor_batch_size_messages_sum"] == (
            published + dead + samples.get("processor_messages_skipped_total", 0)
        )
        assert samples["processor_script_call_seconds_count"] >= 1
        assert samples["processor_publish_to_stream_seconds_count"] >= 1
        assert samples.get("processor_consumer_restarts_total", 0) == 0
        assert "redis://" not in get(port, "/metrics")[1]

        victim = next(iter(daemon.consumers()))
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: scrape(port).get("processor_consumer_restarts_total") == 1,
            20,
            message="restart not counted",
        )
        wait_until(lambda: get(port, "/readyz")[0] == 200, 20, message="not ready again")
        assert scrape(port)["processor_messages_written_total"] == published  # kept across pids
        daemon.stop("metrics test")
    finally:
        redis_client.close()


def test_labelled_counters_exist_at_zero_from_the_start_beside_the_build_and_each_process(
    procs, redis_url
):
    port = free_port()
    start_daemon(procs, redis_url, "partitioned", count=2, METRICS_PORT=port)
    redis_client = client(redis_url)
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 20, message="never ready")
        samples = scrape(port)
        # Before any message or fault: every series rate() and absent() will look at.
        for reason in REASON_CODES:
            assert samples[f'processor_messages_dead_lettered_total{{reason="{reason}"}}'] == 0
        for connection in CONNECTIONS:
            assert samples[f'processor_redis_reconnects_total{{connection="{connection}"}}'] == 0
        for name in ("lost", "left_to_takeover", "written"):
            assert samples[f"processor_messages_{name}_total"] == 0
        assert samples['processor_messages_received_total{role="reader"}'] == 0
        assert samples["processor_handler_batch_seconds_count"] == 0
        python = platform.python_version()
        assert samples[f'processor_build_info{{python="{python}",version="{version()}"}}'] == 1
        for process in ("supervisor", "consumer-0", "consumer-1"):
            assert samples[f'processor_process_cpu_seconds_total{{process="{process}"}}'] > 0
            memory = samples[f'processor_process_resident_memory_bytes{{process="{process}"}}']
            assert memory > 10_000_000, (process, memory)

        for n in range(3):
            assert redis_client.publish(CHANNEL, f'{{"message_id": "m-{n}"}}') == 2
        wait_until(lambda: redis_client.xlen(OUTPUT) == 3, 20, message="not written")
        wait_until(
            lambda: scrape(port)['processor_messages_received_total{role="reader"}'] == 6,
            20,
            message="received not counted per reader",
        )
        assert scrape(port)["processor_handler_batch_seconds_count"] >= 1
    finally:
        redis_client.close()


def test_process_usage_reads_a_process_whose_name_holds_parentheses_and_skips_a_gone_one(
    procs, tmp_path: Path
):
    # The command name in /proc/<pid>/stat is the executable's: a link named like this one.
    link = tmp_path / "p) 1 (x"
    link.symlink_to(sys.executable)
    sleeper = procs.start(
        ["-c", "import time; sum(range(10**7)); print('up', flush=True); time.sleep(60)"],
        executable=str(link),
    )
    wait_until(lambda: "up" in procs.output(sleeper), 10, message="never started")
    found = usage(sleeper.pid)
    assert found is not None
    status = Path(f"/proc/{sleeper.pid}/status").read_text()
    vm_rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    assert abs(found.rss_bytes - vm_rss_kb * 1024) < 1_000_000, (found, vm_rss_kb)
    assert 0.05 < found.cpu_s < 60  # it counted to 10**7 first
    sleeper.terminate()
    sleeper.wait(timeout=10)  # reaped: its /proc entry is gone
    assert usage(sleeper.pid) is None


def test_readers_and_fed_consumers_are_shown_apart(procs, redis_url):
    """Three consumers: two readers subscribe and feed the third. /metrics, /readyz and
    ``processor status`` tell them apart."""
    port = free_port()
    start_daemon(procs, redis_url, "partitioned", count=3, METRICS_PORT=port)
    redis_client = client(redis_url)
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 20, message="never ready")
        text = get(port, "/readyz")[1]
        assert "2 readers subscribed, 1 fed by them" in text, text
        wait_until(
            lambda: (
                scrape(port).get('processor_consumer_receiving{role="fed"}') == 1
                and scrape(port).get('processor_consumer_receiving{role="reader"}') == 2
                and scrape(port).get("processor_reader_feeds") == 1
                # SPREAD=always: the reader that feeds it sends it its messages.
                and scrape(port).get("processor_reader_spreading") == 1
            ),
            20,
            message=lambda: f"roles not shown: {scrape(port)}",
        )
        # A reader routes by the view of its last beat: until both have beaten once with the
        # fed consumer listed, its lanes go to their old owners, who write them (no loss).
        # So publish in rounds until the fed consumer has received some.
        published = 0

        def publish_round() -> bool:
            nonlocal published
            for _ in range(20):
                assert redis_client.publish(CHANNEL, f'{{"message_id": "r-{published}"}}') == 2
                published += 1
            wait_until(lambda: redis_client.xlen(OUTPUT) == published, 20, message="not written")
            return scrape(port).get('processor_messages_received_total{role="fed"}', 0) > 0

        wait_until(publish_round, 20, interval=0.3, message=lambda: f"fed got none: {scrape(port)}")
        wait_until(
            lambda: (
                scrape(port)['processor_messages_received_total{role="reader"}'] == 2 * published
            ),
            20,
            message=lambda: f"readers' receipts not counted: {published=} {scrape(port)}",
        )
        table = subprocess.run(
            [sys.executable, "-m", "processor", "status", "--redis-url", redis_url],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert table.count(" fed ") == 1 and table.count("reader>") == 1, table
        assert table.count("subscribed") == 2, table
    finally:
        redis_client.close()


def test_a_stopped_consumer_is_not_believed_past_the_heartbeat_ttl(procs, redis_url):
    """A reader SIGSTOPped writes nothing: the ready and receiving it last reported count for
    nothing once older than HEARTBEAT_TTL_MS (/readyz, processor_consumers_live,
    processor_consumer_receiving), and the probes follow it back once it runs again."""
    port = free_port()
    daemon = start_daemon(procs, redis_url, "partitioned", count=2, METRICS_PORT=port)
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, message="never ready")
    victim, other = sorted(daemon.consumers())
    os.kill(victim, signal.SIGSTOP)
    try:

        def not_believed() -> bool:
            status, text = get(port, "/readyz")
            return (
                status == 503
                and text.startswith("not reporting")
                and receiving(port) == {victim: 0, other: 1}
                and scrape(port)["processor_consumers_live"] == 1
            )

        # The supervisor's loop updates the live gauge about every TTL / 3.
        wait_until(
            not_believed,
            2.5 * HEARTBEAT_TTL_MS / 1000,
            message=lambda: (
                f"a stopped consumer still believed: {get(port, '/readyz')} {receiving(port)}"
            ),
        )
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_until(
        lambda: get(port, "/readyz")[0] == 200 and receiving(port) == {victim: 1, other: 1},
        20,
        message=lambda: f"not ready again: {get(port, '/readyz')}",
    )


def test_a_redis_outage_shows_at_once_and_ready_returns_only_once_registered(
    procs, private_redis: RedisServer
):
    """Redis down: every consumer goes on reporting (the reports need no Redis) that it does
    not receive (readers unsubscribed, the fed one unfed), past the TTL; back up and empty,
    /readyz is 200 again only once every consumer is listed again."""
    port = free_port()
    daemon = start_daemon(procs, private_redis.url, "partitioned", count=3, METRICS_PORT=port)
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, message="never ready")
    os.kill(private_redis.pid, signal.SIGKILL)
    wait_until(lambda: not private_redis.is_running(), 10, message="Redis not down")

    def in_a_gap() -> bool:
        status, text = get(port, "/readyz")
        return (
            status == 503
            and text == "not receiving and registered: slots 0, 1, 2\n"
            and set(receiving(port).values()) == {0}
            and scrape(port)["processor_consumers_live"] == 0
        )

    wait_until(in_a_gap, HEARTBEAT_TTL_MS / 1000, message=lambda: f"no gap: {get(port, '/readyz')}")
    # Reports older than the TTL would read "not reporting": they go on without Redis.
    until = time.monotonic() + 2 * HEARTBEAT_TTL_MS / 1000
    while time.monotonic() < until:
        assert in_a_gap(), f"{get(port, '/readyz')} {receiving(port)}"
    private_redis.start()

    def ready() -> bool:
        if get(port, "/readyz")[0] != 200:
            return False
        listed = daemon.listed()
        assert len(listed) == 3, f"ready while only {listed} are listed"
        return True

    wait_until(ready, 20, interval=0.01, message=lambda: f"not ready again: {get(port, '/readyz')}")
    assert set(receiving(port).values()) == {1}
