"""Live control, end to end: SIGTTIN adds a consumer, SIGTTOU removes one, SIGHUP reloads the
configuration file and applies what can change live, all while messages flow, none lost."""

from __future__ import annotations

import json
import re
import signal

import pytest

from processor.config import Settings
from processor.store.keys import Keys
from tests.faults_support import (
    CHANNEL,
    Daemon,
    Expected,
    check_published,
    check_streams,
    client,
    daemon_env,
    publish_invalid,
    settle,
    slot_of,
    start_daemon,
    start_publisher,
)
from tests.faults_support import finish as finish_fault
from tests.helpers import wait_until

WAIT_S = 30


def logged_at(log: str, origin: str, text: str) -> float:
    """When the first line from ``origin`` with ``text`` was logged, in seconds of its day."""
    line = next(line for line in log.splitlines() if origin in line and text in line)
    clock = line.split()[1].partition("+")[0]
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def finish(daemon: Daemon, redis_url: str, publisher, why: str) -> None:
    check_published(redis_url, publisher, why)
    daemon.stop(why)


def test_sigttin_adds_a_consumer_and_sigttou_drains_and_removes_one(procs, redis_url, tmp_path):
    daemon = start_daemon(procs, redis_url, "partitioned", count=2)
    redis_client = client(redis_url)
    publish_invalid(redis_client, "control")
    redis_client.close()
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 6.0, rate=1000)
    publisher.wait_published(1000)
    daemon.proc.send_signal(signal.SIGTTIN)
    wait_until(lambda: len(daemon.listed()) == 3, WAIT_S, message="SIGTTIN added nobody")
    assert "SIGTTIN: consumers 2 -> 3" in daemon.log()
    publisher.wait_published(3000)
    daemon.proc.send_signal(signal.SIGTTOU)
    wait_until(
        lambda: (
            len(daemon.listed()) == 2
            and len(daemon.consumers()) == 2
            and "stopped with code 0 and leaves the group" in daemon.log()
        ),
        WAIT_S,
        message="SIGTTOU removed nobody",
    )
    log = daemon.log()
    assert "SIGTTOU: consumers 3 -> 2" in log
    assert re.search(r"consumer slot 2 \(pid \d+\) drains, writes what it holds and leaves", log)
    assert "stopped with code 0 and leaves the group" in log
    assert "replacing it in" not in log  # a removal is not a crash
    daemon.proc.send_signal(signal.SIGTTOU)
    wait_until(lambda: len(daemon.listed()) == 1, WAIT_S, message="second SIGTTOU")
    daemon.proc.send_signal(signal.SIGTTOU)
    wait_until(
        lambda: "SIGTTOU ignored: the last consumer stays" in daemon.log(), WAIT_S, message="last"
    )
    daemon.count = 1
    finish(daemon, redis_url, publisher, "SIGTTIN/SIGTTOU")


def test_a_consumer_removed_with_more_work_than_the_takeover_buffer_spans_loses_nothing(
    procs, redis_url, bclient, tmp_path
):
    """Its drain outlasts TAKEOVER_BUFFER_MS: what is published meanwhile must reach the others
    at once (the readers keep what they routed to it only that long)."""
    daemon = start_daemon(
        procs,
        redis_url,
        "partitioned",
        count=3,
        HANDLER="tests.handlers_for_tests:slow_10ms",
        TAKEOVER_BUFFER_MS=2000,
        SHUTDOWN_GRACE=60,
    )
    publish_invalid(bclient, "drain")
    (removed,) = [member for member in daemon.listed() if slot_of(member) == 2]
    info = Keys.from_settings(Settings()).info(removed)  # its status: what it received, holds
    burst: list[str] = []

    def publish(count: int) -> None:
        ids = [f"burst-{len(burst) + n}" for n in range(count)]
        pipe = bclient.pipeline(transaction=False)
        for message_id in ids:
            pipe.publish(CHANNEL, json.dumps({"message_id": message_id}))
        assert all(receivers >= 1 for receivers in pipe.execute())
        burst.extend(ids)

    # A trickle until the readers route its share to it (the hand-over grace after a join),
    # then about 450 messages each at once: 4.5 s of work for the fed consumer in slot 2, the
    # one removed once it holds most of them (a burst spread over time leaves it less to drain
    # on a loaded machine).
    wait_until(
        lambda: publish(1) or int(bclient.hget(info, "received") or 0) > 0,
        WAIT_S,
        message=lambda: f"nothing routed to the fed consumer: {bclient.hgetall(info)}",
    )
    publish(1350)
    wait_until(
        lambda: int(bclient.hget(info, "held") or 0) >= 300,
        WAIT_S,
        message=lambda: f"the fed consumer never held its share: {bclient.hgetall(info)}",
    )
    daemon.proc.send_signal(signal.SIGTTOU)
    steady = start_publisher(procs, redis_url, tmp_path / "steady.txt", 6.0, rate=100)
    wait_until(
        lambda: "stopped with code 0 and leaves the group" in daemon.log(),
        WAIT_S,
        message="the removed consumer did not finish its drain",
    )
    steady.finish()
    daemon.count = 2
    log = daemon.log()
    drain_s = logged_at(log, "consumer-2 ", "consumer stopped") - logged_at(log, "", "drains")
    assert drain_s > 2.5, f"the drain took {drain_s:.1f} s: not the case under test"
    expected = Expected(steady.records(), extra_written=set(burst))
    finish_fault(daemon, bclient, expected, "removed while holding more than the buffer spans")


def test_sighup_applies_live_settings_by_replacing_consumers_one_by_one(procs, redis_url, tmp_path):
    config = tmp_path / "processor.toml"
    config.write_text('consumers_count = 2\nprocessing_batch_size = 100\nloglevel = "INFO"\n')
    env = daemon_env(redis_url, "partitioned", 2, {})
    del env["CONSUMERS_COUNT"], env["LOGLEVEL"]  # from the file, so a reload can change them
    proc = procs.start(["demo/consume.py", "--config", str(config)], env=env)
    daemon = Daemon(procs, proc, redis_url, 2)
    daemon.wait_in_step(WAIT_S, "daemon did not start")
    old_ids = set(daemon.listed())
    redis_client = client(redis_url)
    publish_invalid(redis_client, "SIGHUP")
    redis_client.close()
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 6.0, rate=1000)
    publisher.wait_published(1000)

    config.write_text('consumers_count = 5\nprocessing_batch_size = 7\nloglevel = "DEBUG"\n')
    proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: daemon.log().count("batch=7 ") == 2 and not old_ids & set(daemon.listed()),
        WAIT_S,
        message="consumers not replaced with the reloaded settings",
    )
    daemon.wait_in_step(WAIT_S, "group not whole after the reload")
    log = daemon.log()
    assert "SIGHUP: applied loglevel 'INFO' -> 'DEBUG'; processing_batch_size 100 -> 7" in log
    assert "SIGHUP: consumers_count 2 -> 5 needs a restart of the daemon: not applied" in log
    assert "exited with code" not in log  # replaced on purpose, not crashed

    config.write_text("consumers_count = [broken\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "SIGHUP: configuration not reloaded" in daemon.log(), WAIT_S, message="bad file"
    )
    assert proc.poll() is None
    finish(daemon, redis_url, publisher, "SIGHUP")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGTTOU], ids=["stop", "scale-down"])
def test_a_stop_while_redis_pauses_writes_past_the_ttl_loses_nothing(
    procs, redis_url, bclient, tmp_path, signum
):
    """Every stopping consumer is declared dead in its flush (the pause outlasts the heartbeat
    TTL), and with SIGTERM nobody is left to take over: each writes what it holds anyway."""
    daemon = start_daemon(procs, redis_url, "partitioned", count=3)
    publish_invalid(bclient, "pause")
    publisher = start_publisher(procs, redis_url, tmp_path / "record.txt", 4.0, rate=2000)
    publisher.wait_published(4000)
    daemon.proc.send_signal(signum)
    bclient.execute_command("CLIENT", "PAUSE", 2500, "WRITE")
    if signum == signal.SIGTERM:
        assert daemon.proc.wait(timeout=60) == 0, daemon.log()[-3000:]
        publisher.finish()
        expected = Expected(publisher.records())
        assert settle(bclient, expected, timeout=10), check_streams(bclient, expected, "stop")
        check_streams(bclient, expected, "stop while paused")
        assert "rejoined after a stall" in daemon.log()
        # Redis paused past the TTL: the keys expired, they were not lost.
        assert "our heartbeat key was gone" not in daemon.log()
        daemon.close()
        return
    publisher.finish()
    daemon.count = 2
    finish_fault(daemon, bclient, Expected(publisher.records()), "scale-down while paused")
