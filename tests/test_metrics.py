"""The metrics endpoint end to end: the daemon with METRICS_PORT, scraped over HTTP."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from demo.redis_server import free_port
from tests.faults_support import (
    CHANNEL,
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
            return samples.get("processor_messages_written_total") == published and samples.get(
                "processor_messages_received_total"
            ) == 2 * (published + 3)

        wait_until(counted, 20, message=f"counters never matched: {scrape(port)}")
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
