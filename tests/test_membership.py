"""Birth, heartbeat, pruning and death of consumers, against a real redis-server."""

from __future__ import annotations

import os
import queue
import socket
import threading
from typing import Any

import pytest
import redis

from processor.config import Settings
from processor.consumer import membership
from processor.consumer.heartbeat import Heartbeat
from processor.consumer.membership import (
    Membership,
    evict_process,
    leave_script,
    new_consumer_id,
    now_ms,
    process_id_prefix,
    read_view,
)
from processor.consumer.ownership import RaceStrategy
from processor.consumer.subscriber import Gap
from processor.errors import WrongType
from processor.store.keys import Keys
from processor.store.keytypes import name_wrong_key
from tests.helpers import tagged, wait_until

TTL_MS = 5_000


def _member(client: redis.Redis, keys: Keys, consumer_id: str, ttl_ms: int = TTL_MS) -> Membership:
    membership = Membership(client, keys, heartbeat_ttl_ms=ttl_ms)
    membership.register(consumer_id)
    return membership


def test_register_lists_the_id_and_sets_a_heartbeat_with_ttl(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    before = now_ms()
    member = _member(client, keys, "c-1")
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]
    assert r.get(keys.heartbeat("c-1")) == member.token
    assert TTL_MS - 1_000 < r.pttl(keys.heartbeat("c-1")) <= TTL_MS
    registered = int(member.token.rpartition(":")[2])
    assert before <= registered <= now_ms()


def test_beat_reports_alive_and_every_member(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    first = _member(client, keys, "c-1")
    second = _member(client, keys, "c-2")
    view = first.beat()
    assert view.alive
    assert set(view.members) == {"c-1", "c-2"}
    assert view.members["c-2"] == int(second.token.rpartition(":")[2])
    assert second.beat().alive


def test_beat_extends_the_heartbeat(client: redis.Redis, keys: Keys, r: redis.Redis) -> None:
    member = _member(client, keys, "c-1")
    r.pexpire(keys.heartbeat("c-1"), 300)
    assert member.beat().alive
    assert r.pttl(keys.heartbeat("c-1")) > 1_000
    assert r.get(keys.heartbeat("c-1")) == member.token  # extended, not rewritten


def test_a_member_without_heartbeat_is_pruned_and_does_not_come_back(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    survivor = _member(client, keys, "c-1")
    lost = _member(client, keys, "c-2")
    r.delete(keys.heartbeat("c-2"))

    view = survivor.beat()
    assert view.alive
    assert set(view.members) == {"c-1"}
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]

    # The pruned member learns it was declared dead, and stays out.
    assert lost.beat().alive is False
    assert not r.exists(keys.heartbeat("c-2"))
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]
    assert lost.beat().alive is False
    assert set(survivor.beat().members) == {"c-1"}


def test_an_expired_heartbeat_is_pruned(client: redis.Redis, keys: Keys, r: redis.Redis) -> None:
    survivor = _member(client, keys, "c-1")
    _member(client, keys, "c-short", ttl_ms=200)
    wait_until(lambda: not r.exists(keys.heartbeat("c-short")), timeout=5)
    assert set(survivor.beat().members) == {"c-1"}
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]


def test_pruning_removes_every_copy_of_a_dead_id(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    survivor = _member(client, keys, "c-1")
    r.rpush(keys.consumers, "stale", "stale")  # left by a crashed run, no heartbeat
    assert set(survivor.beat().members) == {"c-1"}
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]


def _departures(r: redis.Redis, keys: Keys) -> list[tuple[str, str]]:
    return [(fields["consumer_id"], fields["reason"]) for _, fields in r.xrange(keys.departures)]


def test_leave_removes_list_entry_and_heartbeat_and_announces_it(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    staying = _member(client, keys, "c-1")
    leaving = _member(client, keys, "c-2")
    leaving.leave("stopped")
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]
    assert not r.exists(keys.heartbeat("c-2"))
    assert _departures(r, keys) == [("c-2", "stopped")]
    assert set(staying.beat().members) == {"c-1"}
    Membership(client, keys, TTL_MS).leave("stopped")  # never registered: nothing to do
    assert len(_departures(r, keys)) == 1


def test_a_step_down_hands_the_share_over_and_keeps_the_heartbeat_until_the_leave(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    staying = _member(client, keys, "c-1")
    flushing = _member(client, keys, "c-2")
    flushing.step_down("stopping")
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]
    assert _departures(r, keys) == [("c-2", "stopping")]
    assert set(staying.beat().members) == {"c-1"}
    # It still beats (its writes are not fenced) and is not listed again while it flushes.
    view = flushing.beat()
    assert view.alive and set(view.members) == {"c-1"}
    assert r.get(keys.heartbeat("c-2")) == flushing.token
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]
    flushing.leave("stopped")
    assert not r.exists(keys.heartbeat("c-2"))
    assert len(_departures(r, keys)) == 1  # announced once, when it stepped down


def test_a_step_down_that_did_not_reach_redis_is_repeated_by_the_next_beat(
    client: redis.Redis, keys: Keys, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    staying = _member(client, keys, "c-1")
    flushing = _member(client, keys, "c-2")
    real_remove = membership.remove

    def unreachable(*args: object, **kwargs: object) -> list[str]:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(membership, "remove", unreachable)
    flushing.step_down("stopping")  # logged, not raised: the flush goes on
    assert r.lrange(keys.consumers, 0, -1) == ["c-1", "c-2"]
    monkeypatch.setattr(membership, "remove", real_remove)
    view = flushing.beat()
    assert view.alive and set(view.members) == {"c-1"}
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]
    assert _departures(r, keys) == [("c-2", "stopping")]
    assert set(staying.beat().members) == {"c-1"}
    flushing.beat()
    assert len(_departures(r, keys)) == 1


def test_a_step_down_with_the_departures_key_of_another_type_still_hands_the_share_over(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """Someone overwrote the departures stream: the flush must go on, and the others see the
    share handed over at their next beat instead of at once."""
    staying = _member(client, keys, "c-1")
    flushing = _member(client, keys, "c-2")
    r.set(keys.departures, "not a stream")
    flushing.step_down("stopping")  # logged, not raised
    assert set(staying.beat().members) == {"c-1"}
    view = flushing.beat()
    assert view.alive and set(view.members) == {"c-1"}
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]


def test_a_leaving_id_that_was_pruned_still_loses_its_heartbeat(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    member = _member(client, keys, "c-1")
    r.lrem(keys.consumers, 0, "c-1")
    member.leave("stopped")
    assert not r.exists(keys.heartbeat("c-1"))
    assert _departures(r, keys) == []  # nobody had it in their view


def test_evicting_a_dead_process_removes_every_id_it_registered_and_no_other(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    prefix = process_id_prefix(4242, 1)
    _member(client, keys, prefix + "aaaaaa")
    _member(client, keys, prefix + "bbbbbb")  # the same process, rejoined after a stall
    _member(client, keys, process_id_prefix(4242, 11) + "cccccc")  # slot 11, not slot 1
    _member(client, keys, process_id_prefix(42420, 1) + "dddddd")
    removed = evict_process(leave_script(client), keys, 4242, 1, "exited with code -9")
    assert sorted(removed) == [prefix + "aaaaaa", prefix + "bbbbbb"]
    assert sorted(r.lrange(keys.consumers, 0, -1)) == sorted(
        [process_id_prefix(4242, 11) + "cccccc", process_id_prefix(42420, 1) + "dddddd"]
    )
    assert not r.exists(keys.heartbeat(prefix + "aaaaaa"))
    assert not r.exists(keys.heartbeat(prefix + "bbbbbb"))
    assert [reason for _, reason in _departures(r, keys)] == ["exited with code -9"] * 2
    assert evict_process(leave_script(client), keys, 4242, 1, "again") == []


def test_read_view_refreshes_nobody(client: redis.Redis, keys: Keys, r: redis.Redis) -> None:
    member = _member(client, keys, "c-1")
    r.pexpire(keys.heartbeat("c-1"), 1_500)
    view = read_view(client, keys)
    assert view.alive is False  # it is nobody's heartbeat
    assert set(view.members) == {"c-1"}
    assert r.pttl(keys.heartbeat("c-1")) <= 1_500
    member.read()
    assert r.pttl(keys.heartbeat("c-1")) <= 1_500


def test_read_view_prunes_dead_ids(client: redis.Redis, keys: Keys, r: redis.Redis) -> None:
    _member(client, keys, "c-1")
    r.rpush(keys.consumers, "crashed-earlier")
    assert set(read_view(client, keys).members) == {"c-1"}
    assert r.lrange(keys.consumers, 0, -1) == ["c-1"]


def test_another_daemon_with_its_own_prefix_is_left_alone(
    client: redis.Redis, redis_url: str, r: redis.Redis
) -> None:
    ours = Keys.from_settings(Settings(redis_url=redis_url))
    theirs = Keys.from_settings(
        Settings(redis_url=redis_url, consumers_list="other:ids", key_prefix="other")
    )
    mine = _member(client, ours, "c-1")
    _member(client, theirs, "x-1")
    assert set(mine.beat().members) == {"c-1"}
    assert r.lrange(theirs.consumers, 0, -1) == ["x-1"]


def test_consumer_ids_are_unique_and_say_where_they_run() -> None:
    ids = {new_consumer_id(0) for _ in range(100)}
    assert len(ids) == 100
    one = next(iter(ids))
    assert one.startswith(f"{socket.gethostname()}-{os.getpid()}-0-")


def test_a_live_consumer_lists_itself_again_when_the_list_is_deleted_or_overwritten(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """Else a view without the live consumers gives their share to no one: the messages
    published meanwhile are only buffered, and lost once the buffers age."""
    first, second = _member(client, keys, "c-1"), _member(client, keys, "c-2")
    r.delete(keys.consumers)
    assert set(first.beat().members) == {"c-1"}
    assert set(second.beat().members) == {"c-1", "c-2"}
    r.delete(keys.consumers)
    r.set(keys.consumers, "someone else's")
    with pytest.raises(WrongType):
        first.beat()
    r.delete(keys.consumers)
    first.beat()
    assert set(second.beat().members) == {"c-1", "c-2"}
    assert sorted(r.lrange(keys.consumers, 0, -1)) == ["c-1", "c-2"]


def test_a_gap_of_the_last_moment_is_published_as_the_heartbeat_ends(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """A fed consumer whose reader stops first moves and counts a gap in its stop line; its
    heartbeat ends with the flush, before another beat would publish it."""
    gaps: queue.SimpleQueue[Gap] = queue.SimpleQueue()
    done = threading.Event()
    heartbeat = Heartbeat(
        client,
        keys,
        _member(client, keys, "c-1"),
        RaceStrategy(),
        interval_s=60.0,
        backlog_warn_bytes=2**30,
        stop=threading.Event(),
        done=done,
        tagged=tagged("[c-1]"),
        subscriptions=list,
        on_takeover=lambda taken: None,
        on_fenced=lambda: None,
        on_failure=lambda name, error: None,
        status=dict,
        report=lambda: None,
        gaps=gaps,
    )
    gaps.put(Gap(1_000, 1_012))
    done.set()
    heartbeat.work()
    published = [fields for _, fields in r.xrange(keys.gaps)]
    assert published == [{"consumer_id": "c-1", "start_ms": "1000", "end_ms": "1012"}]


def test_a_script_refused_by_a_key_of_another_type_names_that_key(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """Redis's WRONGTYPE names no key (in a script, only its line): ours names the key, its
    type and what the daemon keeps there, so the operator knows what to delete."""
    member = _member(client, keys, "c-1")
    r.delete(keys.consumers)
    r.set(keys.consumers, "someone else's value")
    with pytest.raises(WrongType) as beat:
        member.beat()
    assert beat.value.status_code == "WRONGTYPE"
    assert str(beat.value) == (
        f"{keys.consumers} holds a string where the daemon keeps a list "
        "(membership.lua): delete or rename that key"
    )
    r.delete(keys.consumers)
    r.rpush(keys.consumers, "c-1")
    r.hset(keys.departures, "a", "b")
    with pytest.raises(WrongType, match=rf"^{keys.departures} holds a hash where"):
        member.leave("stopping")


def test_a_wrong_type_under_a_name_built_inside_a_script_names_the_script(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """A heartbeat key is built inside the script from the id: its KEYS are all right, so the
    refusal says which script refused, with Redis's words."""
    member = _member(client, keys, "c-1")
    r.rpush(keys.consumers, "c-2")
    r.rpush(keys.heartbeat("c-2"), "not a heartbeat")
    redis_words = r"^Operation against a key holding the wrong kind .*\(membership\.lua\)$"
    with pytest.raises(WrongType, match=redis_words):
        member.beat()


def test_a_refusal_stays_in_redis_words_when_the_types_cannot_be_read() -> None:
    """Naming the key takes a TYPE per key: with Redis gone meanwhile, the refusal is raised
    as it came (and retried as one), not replaced by the failed lookup."""

    class Unreachable:
        def type(self, key: str) -> str:
            raise redis.ConnectionError("Connection refused")

    error = WrongType("Operation against a key holding the wrong kind of value")
    unreachable: Any = Unreachable()
    assert name_wrong_key(error, unreachable, [("consumer:ids", "list")], "leave.lua") is error
