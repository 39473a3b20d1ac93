"""The control plane against a real redis-server, in process: two hosts' steering, the split,
expiry, the host-id claim, group stop, idle stop and one autoscale decision."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import redis

from processor.config import Settings
from processor.errors import ConfigError, GroupStopped
from processor.group import controlplane
from processor.group.steering import Steering
from processor.store.keys import Keys

SETTINGS = Settings(heartbeat_ttl_ms=300, heartbeat_interval_ms=100, max_consumers=8)
KEYS = Keys.from_settings(SETTINGS)


NO_STOP = threading.Event()
# Beats are due by monotonic time; the tests pass it, well after the start-up beat.
T0 = time.monotonic() + 3600


def steering(r: redis.Redis, host: str, **changes: object) -> Steering:
    settings = dataclasses.replace(SETTINGS, host_id=host, **changes)
    return Steering(settings, r, KEYS)


@pytest.fixture
def client(redis_url: str):
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def test_hosts_split_the_desired_size_and_a_silent_host_expires(client) -> None:
    a, b = steering(client, "host-a"), steering(client, "host-b")
    assert a.start(1, NO_STOP).size is None  # no desired size: CONSUMERS_COUNT
    assert b.start(1, NO_STOP).size is None
    controlplane.set_desired(client, KEYS, 5, "test")
    assert a.tick(1, 0, now=T0 + 10.0).size == 3
    assert b.tick(1, 0, now=T0 + 10.0).size == 2
    _, hosts = controlplane.read_control(client, KEYS)
    assert sorted(hosts) == ["host-a", "host-b"]
    # host-b stops beating: once its registration expires (Redis's clock), host-a takes all.
    client.zadd(KEYS.hosts, {"host-b": 0})
    assert a.tick(3, 0, now=T0 + 20.0).size == 5
    _, hosts = controlplane.read_control(client, KEYS)
    assert list(hosts) == ["host-a"]


def test_a_ceiling_caps_a_share_and_the_rest_goes_to_the_other_host(client) -> None:
    a = steering(client, "host-a", max_consumers=1)
    b = steering(client, "host-b", max_consumers=8)
    a.start(0, NO_STOP), b.start(0, NO_STOP)
    controlplane.set_desired(client, KEYS, 6, "test")
    assert a.tick(0, 0, now=T0 + 10.0).size == 1
    assert b.tick(0, 0, now=T0 + 10.0).size == 5
    controlplane.set_desired(client, KEYS, 12, "test")
    assert b.tick(5, 0, now=T0 + 20.0).size == 8  # 3 short
    info = json.loads(client.hget(KEYS.host_info, "host-b"))
    assert info["running"] == 5
    b.tick(8, 0, now=T0 + 30.0)
    _, hosts = controlplane.read_control(client, KEYS)
    assert hosts["host-b"].shortfall == 3 and hosts["host-b"].share == 8


def test_cleared_desired_size_hands_back_to_consumers_count(client) -> None:
    a = steering(client, "host-a")
    a.start(0, NO_STOP)
    controlplane.set_desired(client, KEYS, 3, "test")
    assert a.tick(0, 0, now=T0 + 10.0).size == 3
    assert controlplane.clear_desired(client, KEYS, "test") == 3
    assert a.tick(3, 0, now=T0 + 20.0).size is None


def test_a_desired_size_that_redis_lost_is_restored_not_dropped(client, caplog) -> None:
    a, b = steering(client, "host-a"), steering(client, "host-b")
    a.start(0, NO_STOP), b.start(0, NO_STOP)
    controlplane.set_desired(client, KEYS, 6, "test")
    assert a.tick(0, 0, now=T0 + 10.0).size == 3
    assert b.tick(0, 0, now=T0 + 10.0).size == 3
    client.flushall()  # as a restart without persistence would
    assert a.tick(3, 0, now=T0 + 20.0).size == 3  # keeps its share, puts the size back
    assert b.tick(3, 0, now=T0 + 20.0).size == 3
    control, _ = controlplane.read_control(client, KEYS)
    assert control.desired == 6 and "restoring it after Redis lost it" in control.desired_by
    assert caplog.text.count("restored it to 6") == 1  # one host restores, the other sees it


def test_a_live_host_id_cannot_be_claimed_twice(client) -> None:
    first = steering(client, "twin")
    first.start(1, NO_STOP)
    done = threading.Event()

    def keep_beating() -> None:
        while not done.is_set():
            first.tick(1, 0)
            done.wait(0.02)

    beating = threading.Thread(target=keep_beating)
    beating.start()
    try:
        with pytest.raises(ConfigError, match="'twin' is already registered by a live daemon"):
            steering(client, "twin").start(1, NO_STOP)
    finally:
        done.set()
        beating.join()


def test_the_registration_of_a_daemon_killed_a_moment_ago_is_waited_out(client, caplog) -> None:
    steering(client, "restarted").start(1, NO_STOP)  # then never beats again, as if killed
    assert steering(client, "restarted").start(1, NO_STOP).size is None
    assert "host id 'restarted' is registered by another daemon" in caplog.text


def test_group_stop_refuses_a_start_and_stops_a_running_host(client) -> None:
    a = steering(client, "host-a")
    a.start(1, NO_STOP)
    controlplane.request_stop(client, KEYS, "processor stop (test)")
    assert "asked to stop: processor stop (test)" in a.tick(1, 0, now=T0 + 10.0).stop_reason
    with pytest.raises(GroupStopped, match="processor stop"):
        steering(client, "host-b").start(0, NO_STOP)
    assert controlplane.clear_stop(client, KEYS)
    steering(client, "host-b").start(0, NO_STOP)
    # processor scale clears a stop too.
    controlplane.request_stop(client, KEYS, "again")
    controlplane.set_desired(client, KEYS, 2, "test")
    assert not a.tick(1, 0, now=T0 + 20.0).stopping


def test_idle_stop_counts_group_writes_and_local_receipts(client) -> None:
    a = steering(client, "host-a", idle_stop_s=5.0)
    a.start(1, NO_STOP)
    assert not a.tick(1, 0, now=T0 + 10.0).stopping
    client.hincrby(KEYS.stats, "written", 3)
    assert not a.tick(1, 0, now=T0 + 14.0).stopping  # the group wrote: active at 14
    assert not a.tick(1, 7, now=T0 + 18.0).stopping  # we received: active at 18
    assert not a.tick(1, 7, now=T0 + 22.0).stopping
    assert "idle" in a.tick(1, 7, now=T0 + 23.5).stop_reason


def test_one_autoscale_decision_grows_a_group_that_falls_behind(client) -> None:
    a = steering(client, "host-a", autoscale="1:4", autoscale_cooldown_s=0.0)
    b = steering(client, "host-b", autoscale="1:4", autoscale_cooldown_s=0.0)
    a.start(1, NO_STOP), b.start(1, NO_STOP)
    for consumer_id, inbox in (("c1", 5000), ("c2", 10)):
        client.rpush(KEYS.consumers, consumer_id)
        client.hset(KEYS.info(consumer_id), mapping={"busy": 1.0, "inbox": inbox})
    a.tick(1, 0, now=T0 + 10.0)
    b.tick(1, 0, now=T0 + 10.0)  # the same interval: host-a holds the turn
    control, _ = controlplane.read_control(client, KEYS)
    assert control.desired == 3  # 2 consumers fully busy: ceil(2 / 0.7)
    assert control.desired_by == "autoscale on host host-a"
    assert "behind: an inbox holds 5000 messages" in control.autoscale


def busy_consumers(client, count: int) -> None:
    for n in range(count):
        client.rpush(KEYS.consumers, f"c{n}")
        client.hset(KEYS.info(f"c{n}"), mapping={"busy": 1.0, "inbox": 5000})


def test_autoscale_never_asks_for_more_than_the_live_hosts_may_run(client) -> None:
    a = steering(client, "host-a", autoscale="1:32", autoscale_cooldown_s=0.0, max_consumers=2)
    b = steering(client, "host-b", autoscale="1:32", autoscale_cooldown_s=0.0, max_consumers=2)
    a.start(2, NO_STOP), b.start(2, NO_STOP)
    busy_consumers(client, 4)
    a.tick(2, 0, now=T0 + 10.0)
    control, _ = controlplane.read_control(client, KEYS)
    assert control.desired == 4  # behind, but the two hosts may run 4 at most


def test_autoscale_leaves_a_cleared_size_to_the_hosts(client) -> None:
    a = steering(client, "host-a", autoscale="1:4", autoscale_cooldown_s=0.0)
    a.start(1, NO_STOP)
    controlplane.set_desired(client, KEYS, 2, "test")
    controlplane.clear_desired(client, KEYS, "processor scale --clear (test)")
    busy_consumers(client, 2)
    assert a.tick(2, 0, now=T0 + 10.0).size is None
    control, _ = controlplane.read_control(client, KEYS)
    assert control.desired is None and control.cleared_by


def test_autoscale_does_not_overwrite_a_scale_made_after_its_reading(client) -> None:
    assert controlplane.set_desired(client, KEYS, 5, "processor scale")[0]
    # The autoscaler read 2 before that: its write does not apply.
    applied, previous = controlplane.set_desired(client, KEYS, 3, "autoscale", mode="if", seen=2)
    assert not applied and previous == 5
    control, _ = controlplane.read_control(client, KEYS)
    assert control.desired == 5


def test_a_desired_size_that_is_not_a_whole_number_is_ignored_with_a_warning(client, caplog):
    a = steering(client, "host-a")
    a.start(1, NO_STOP)
    client.hset(KEYS.control, "desired", "3.5")
    assert a.tick(1, 0, now=T0 + 10.0).size is None
    assert "desired size in Redis is '3.5', not a whole number >= 1: ignored" in caplog.text


def test_leaving_removes_only_our_own_registration(client) -> None:
    holder = steering(client, "shared")
    holder.start(1, NO_STOP)
    stranger = steering(client, "shared")  # never claimed the id
    stranger.leave()
    _, hosts = controlplane.read_control(client, KEYS)
    assert "shared" in hosts
    holder.leave()
    _, hosts = controlplane.read_control(client, KEYS)
    assert "shared" not in hosts


def test_a_host_whose_registration_expired_keeps_its_consumers_for_a_ttl(client) -> None:
    a, b = steering(client, "host-a"), steering(client, "host-b")
    a.start(0, NO_STOP), b.start(0, NO_STOP)
    controlplane.set_desired(client, KEYS, 6, "test")
    assert a.tick(0, 0, now=T0 + 10.0).size == 3
    assert b.tick(0, 0, now=T0 + 10.0).size == 3
    client.delete(KEYS.hosts, KEYS.host_info)  # both expired, as after a long outage
    assert a.tick(3, 0, now=T0 + 20.0).size == 3  # alone in the registry, yet no burst to 6
    assert b.tick(3, 0, now=T0 + 20.0).size == 3
    assert a.tick(3, 0, now=T0 + 21.0).size == 3  # after the hold, both are registered again
