"""The atomic write against a real redis-server: exactly once, fence, dedup window, counters."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from unittest import mock

import pytest
import redis

from demo.redis_server import RedisServer
from processor.config import MAX_BATCH_SIZE, Settings
from processor.consumer.dedup import (
    DIGEST_BYTES,
    SeenCheck,
    Window,
    digest,
    evicting_policies,
    warn_if_evicting,
)
from processor.consumer.messages import (
    DEAD,
    OUTPUT,
    Entry,
    Message,
    handler_failed,
    output_entry,
    parse,
    reason_kind,
)
from processor.consumer.writer import Writer, WriteResult, dead_letter_time, evalsha_packed
from processor.store.connection import CONNECTION_ERRORS, command_client
from processor.store.keys import Keys
from processor.store.scripts import load_script
from tests.helpers import logged, tagged, wait_until

CONSUMER = "test-consumer-1"


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, dedup_window_ms=60_000, reconnect_backoff_max_s=0.2)


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys.from_settings(settings)


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    client = command_client(settings, name="test-writer")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def writer(client: redis.Redis, keys: Keys, settings: Settings) -> Writer:
    return _writer(client, keys, settings.dedup_window_ms, "[test]")


def _writer(client: redis.Redis, keys: Keys, dedup_window_ms: int, context: str) -> Writer:
    return Writer(client, keys, dedup_window_ms, 0.2, tagged(context), threading.Event(), 1.0)


def _entries(start: int, stop: int) -> list[Entry]:
    return [
        Entry(OUTPUT, f"m-{index}", json.dumps({"message_id": f"m-{index}", "n": index}))
        for index in range(start, stop)
    ]


def _ids(r: redis.Redis, stream: str) -> list[str]:
    return [fields["message_id"] for _, fields in r.xrange(stream)]


def test_a_batch_is_written_once(writer: Writer, keys: Keys, r: redis.Redis) -> None:
    result = writer.write(_entries(0, 50), CONSUMER, "")
    assert result == WriteResult(written=50, dead=0, skipped=0)
    assert _ids(r, keys.output) == [f"m-{index}" for index in range(50)]  # in order
    first = r.xrange(keys.output, count=1)[0][1]
    assert first == {
        "message_id": "m-0",
        "consumer_id": CONSUMER,
        "data": json.dumps({"message_id": "m-0", "n": 0}),
    }


def test_the_same_batch_again_writes_nothing(writer: Writer, keys: Keys, r: redis.Redis) -> None:
    writer.write(_entries(0, 50), CONSUMER, "")
    again = writer.write(_entries(0, 50), "test-consumer-2", "")
    assert again == WriteResult(written=0, dead=0, skipped=50)
    assert r.xlen(keys.output) == 50
    overlapping = writer.write(_entries(40, 60), CONSUMER, "")
    assert overlapping == WriteResult(written=10, dead=0, skipped=10)
    assert sorted(_ids(r, keys.output)) == sorted(f"m-{index}" for index in range(60))


def test_duplicates_inside_one_batch_are_written_once(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    entries = _entries(0, 5)
    result = writer.write([*entries, *entries], CONSUMER, "")
    assert result == WriteResult(written=5, dead=0, skipped=5)
    assert r.xlen(keys.output) == 5
    assert r.hgetall(keys.stats) == {"written": "5", "skipped": "5"}


def test_repeats_inside_one_batch_first_one_wins_whatever_its_kind(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    junk = parse(b"junk", 64)
    message_a = parse(b'{"message_id": "a"}', 64)
    assert isinstance(junk, Entry) and isinstance(message_a, Message)
    failed_a = output_entry(message_a, "not a dict", 64)  # a dead letter with the id "a"
    assert failed_a.kind == DEAD and failed_a.dedup_id == "a"
    output_a = Entry(OUTPUT, "a", '{"message_id": "a"}')
    batch = [junk, failed_a, output_a, junk, *_entries(0, 2)]
    result = writer.write(batch, CONSUMER, "")
    # The dead letter for "a" came first, so the output "a" is its repeat; so is the second junk.
    assert result == WriteResult(written=2, dead=2, skipped=2, dead_flags="110")
    assert _ids(r, keys.output) == ["m-0", "m-1"]
    assert r.xlen(keys.dead) == 2
    # Only repeats (and what is already written): nothing appended, all counted.
    again = writer.write([junk, junk, output_a], CONSUMER, "")
    assert again == WriteResult(written=0, dead=0, skipped=3, dead_flags="00")
    assert r.hgetall(keys.stats) == {"written": "2", "dead": "2", "skipped": "5"}


def test_a_batch_larger_than_one_call_takes_is_written_in_several_exactly_once(
    writer: Writer, client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    entries = _entries(0, 2 * MAX_BATCH_SIZE + 10)
    assert writer.write([parse(b"old junk", 64)], CONSUMER, "").dead == 1  # type: ignore[list-item, union-attr]
    # A dead letter already written in the first call, a new one in the third; repeats that
    # fall in another call than their first occurrence, and a repeated dead letter.
    batch = [
        parse(b"old junk", 64),
        *entries,
        parse(b"junk", 64),
        entries[0],
        entries[-1],
        parse(b"junk", 64),
    ]
    result = writer.write(batch, CONSUMER, "")  # type: ignore[arg-type]
    assert result == WriteResult(len(entries), 1, 4, dead_flags="010")
    assert _ids(r, keys.output) == [entry.dedup_id for entry in entries]
    seen = SeenCheck(client, keys, Window.for_ttl(60_000))
    assert seen.seen([*(entry.dedup_id for entry in entries), "m-never"]) == [True] * len(
        entries
    ) + [False]


def test_the_largest_batch_allowed_is_written_in_one_call(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    entries = [*_entries(0, MAX_BATCH_SIZE - 1), parse(b"junk", 64)]
    with mock.patch("processor.consumer.writer.evalsha_packed", wraps=evalsha_packed) as spy:
        result = writer.write(entries, CONSUMER, "")  # type: ignore[arg-type]
    assert spy.call_count == 1
    assert result == WriteResult(MAX_BATCH_SIZE - 1, 1, 0, dead_flags="1")
    assert r.xlen(keys.output) == MAX_BATCH_SIZE - 1
    again = writer.write(entries, CONSUMER, "")  # type: ignore[arg-type]
    assert again == WriteResult(0, 0, MAX_BATCH_SIZE, dead_flags="0")


def test_two_writers_racing_write_each_entry_once(
    settings: Settings, keys: Keys, r: redis.Redis
) -> None:
    entries = _entries(0, 200)
    batches = [entries[start : start + 10] for start in range(0, 200, 10)]
    start = threading.Barrier(2)
    results: dict[str, list[WriteResult | None]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def race(name: str, order: list[list[Entry]]) -> None:
        client = command_client(settings, name=f"racer-{name}")
        try:
            racer = _writer(client, keys, settings.dedup_window_ms, f"[{name}]")
            start.wait(timeout=10)
            for batch in order:
                results[name].append(racer.write(batch, f"consumer-{name}", ""))
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    # One goes forwards, the other backwards: they meet in the middle and both try every batch.
    threads = [
        threading.Thread(target=race, args=("a", batches)),
        threading.Thread(target=race, args=("b", batches[::-1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    all_results = [result for name in results for result in results[name]]
    assert all(result is not None for result in all_results)
    assert sum(result.written for result in all_results if result) == 200
    assert sum(result.skipped for result in all_results if result) == 200
    ids = _ids(r, keys.output)
    assert len(ids) == 200
    assert sorted(ids) == sorted(entry.dedup_id for entry in entries)
    writers = {fields["consumer_id"] for _, fields in r.xrange(keys.output)}
    assert writers <= {"consumer-a", "consumer-b"}


def test_dead_letters_go_to_the_dead_stream(
    writer: Writer, keys: Keys, client: redis.Redis
) -> None:
    raw_invalid_utf8 = b'{"message_id": "x\xff"}'
    entries = [parse(raw_invalid_utf8, 1024), parse(b"[1,2]", 1024), *_entries(0, 2)]
    assert all(isinstance(entry, Entry) for entry in entries)
    result = writer.write(entries, CONSUMER, "")  # type: ignore[arg-type]
    assert result == WriteResult(written=2, dead=2, skipped=0, dead_flags="11")
    dead = client.xrange(keys.dead)
    assert [fields[b"raw"] for _, fields in dead] == [raw_invalid_utf8, b"[1,2]"]
    assert all(fields[b"consumer_id"] == CONSUMER.encode() for _, fields in dead)
    assert dead[0][1][b"reason"].startswith(b"invalid UTF-8")
    assert dead[1][1][b"reason"] == b"not a JSON object: list"
    # No message_id to carry: the payload had none that could be read.
    assert set(dead[0][1]) == {b"reason_code", b"reason", b"raw", b"consumer_id", b"time"}
    assert [fields[b"reason_code"] for _, fields in dead] == [b"invalid_utf8", b"not_an_object"]
    assert client.xlen(keys.output) == 2
    # The same invalid payload again (a re-publish) is not dead-lettered twice.
    again = writer.write([parse(raw_invalid_utf8, 1024)], CONSUMER, "")  # type: ignore[list-item]
    assert again == WriteResult(written=0, dead=0, skipped=1, dead_flags="0")
    assert client.xlen(keys.dead) == 2
    # The flags say which dead letters of a batch were appended, in order.
    mixed = [entries[1], parse(b"[3]", 1024)]
    assert writer.write(mixed, CONSUMER, "") == WriteResult(0, 1, 1, dead_flags="01")  # type: ignore[arg-type]


def test_a_dead_letter_carries_its_message_id_reason_code_and_time(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    message = parse(b'{"message_id": "m-7", "n": 1}', 1024)
    assert isinstance(message, Message)
    before = dead_letter_time()
    failed = handler_failed(message, "handler raised ValueError: boom", 1024)
    assert writer.write([failed], CONSUMER, "") == WriteResult(0, 1, 0, dead_flags="1")
    ((entry_id, fields),) = r.xrange(keys.dead)
    assert fields["message_id"] == "m-7"
    assert fields["reason_code"] == "handler_error" == reason_kind(fields["reason"])
    assert fields["reason"] == "handler raised ValueError: boom"
    assert fields["raw"] == '{"message_id": "m-7", "n": 1}'
    # UTC ISO-8601 to the millisecond: it sorts as text, and it is no earlier than the call.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])
    assert before <= fields["time"] <= dead_letter_time()
    stamp = datetime.fromisoformat(fields["time"].replace("Z", "+00:00"))
    assert abs(stamp.timestamp() * 1000 - int(entry_id.partition("-")[0])) < 5000
    # Deduplicated by its message_id, as an output: the same failure again is not appended.
    assert writer.write([failed], CONSUMER, "") == WriteResult(0, 0, 1, dead_flags="0")


def test_dead_letter_time_is_utc_iso_8601_to_the_millisecond() -> None:
    assert dead_letter_time(1_796_292_104.1234) == "2026-12-03T10:01:44.123Z"


def test_fence_matching_token_writes(writer: Writer, keys: Keys, r: redis.Redis) -> None:
    r.set(keys.heartbeat(CONSUMER), "token-T", px=10_000)
    assert writer.write(_entries(0, 5), CONSUMER, "token-T") == WriteResult(5, 0, 0)
    assert r.xlen(keys.output) == 5


def test_fence_with_another_token_writes_nothing(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    r.set(keys.heartbeat(CONSUMER), "token-T", px=10_000)
    result = writer.write(_entries(0, 5), CONSUMER, "token-OLD")
    assert result is not None
    assert result.fenced
    assert (result.written, result.dead, result.skipped) == (0, 0, 0)
    assert r.xlen(keys.output) == 0
    assert r.keys(keys.seen_prefix + "*") == []  # no id remembered either
    assert r.hgetall(keys.stats) == {}


def test_fence_with_an_expired_heartbeat_writes_nothing(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    result = writer.write(_entries(0, 5), CONSUMER, "token-T")
    assert result is not None
    assert result.fenced
    assert r.xlen(keys.output) == 0
    assert r.keys(keys.seen_prefix + "*") == []


def test_ids_are_remembered_as_fixed_size_digests_in_one_bucket_set(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    dedup_window_ms = 60_000
    writer = _writer(client, keys, dedup_window_ms, "[window]")
    long_id = "x" * 900_000  # a valid id near MAX_MESSAGE_BYTES costs what a short one does
    entries = [*_entries(0, 3), Entry(OUTPUT, long_id, "{}"), parse(b"junk", 64)]
    writer.write(entries, CONSUMER, "")  # type: ignore[arg-type]
    (seen_key,) = r.keys(keys.seen_prefix + "*")
    members = client.smembers(seen_key)
    assert len(members) == 5
    assert {len(member) for member in members} == {DIGEST_BYTES}
    assert digest(long_id) in members and digest("m-0") in members
    window = Window.for_ttl(dedup_window_ms)
    # Checked by the buckets after it for at least the window; unlinked by the first write of a
    # later bucket, and expires one bucket after that at the latest.
    assert dedup_window_ms < r.pttl(seen_key) <= dedup_window_ms + 2 * window.width_ms


def test_memory_per_remembered_id_is_below_the_lock_keys(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    writer = _writer(client, keys, 600_000, "[memory]")
    count = 20_000
    for start in range(0, count, 500):
        writer.write(_entries(start, start + 500), CONSUMER, "")
    (seen_key,) = r.keys(keys.seen_prefix + "*")
    per_id = r.memory_usage(seen_key, samples=0) / count
    print(f"{per_id:.1f} bytes of the set per remembered id")
    assert per_id < 80  # a lock key cost 80 (MEMORY USAGE) and 97 in used_memory


def test_an_id_is_written_again_only_once_the_window_has_passed(
    client: redis.Redis, keys: Keys, settings: Settings, r: redis.Redis
) -> None:
    dedup_window_ms = 2_000
    writer = _writer(client, keys, dedup_window_ms, "[expiry]")
    seen = SeenCheck(client, keys, Window.for_ttl(dedup_window_ms))
    written_at = time.monotonic()
    assert writer.write(_entries(0, 1), CONSUMER, "").written == 1  # type: ignore[union-attr]
    assert seen.seen(["m-0", "m-1"]) == [True, False]
    wait_until(lambda: seen.seen(["m-0"]) == [False], timeout=15, interval=0.05)
    forgotten_after = time.monotonic() - written_at
    assert forgotten_after >= dedup_window_ms / 1000 - 0.05  # never forgotten inside the window
    print(f"forgotten {forgotten_after:.2f} s after it was written (window 2 s, at most 2.5 s)")
    assert writer.write(_entries(0, 1), CONSUMER, "").written == 1  # type: ignore[union-attr]


def test_outputs_and_dead_letters_are_each_checked_against_their_own_ids(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    # Seen and new outputs and dead letters interleaved, some seen in the current bucket's set
    # and some in an earlier bucket's, so that a flag read for the wrong entry (outputs' for
    # dead letters, or one bucket's answer taken for another's) shows.
    writer = _writer(client, keys, 60_000, "[mixed]")
    junk_a, junk_b, junk_c, junk_d = (parse(f"junk-{n}".encode(), 64) for n in "abcd")
    assert writer.write([*_entries(0, 2), junk_a], CONSUMER, "") == WriteResult(  # type: ignore[list-item]
        2, 1, 0, dead_flags="1"
    )
    window = Window.for_ttl(60_000)
    earlier = int(r.time()[0] * 1000 // window.width_ms) - 1  # checked by the next write too
    client.sadd(f"{keys.seen_prefix}{earlier}", digest("m-2"), digest(junk_b.dedup_id))  # type: ignore[union-attr]
    m0, m2, m3 = _entries(0, 1)[0], _entries(2, 3)[0], _entries(3, 4)[0]
    batch = [m0, junk_c, m2, junk_a, m3, junk_b, junk_d]
    result = writer.write(batch, CONSUMER, "")  # type: ignore[arg-type]
    assert result == WriteResult(written=1, dead=2, skipped=4, dead_flags="1001")
    assert _ids(r, keys.output) == ["m-0", "m-1", "m-3"]
    raws = [fields["raw"] for _, fields in r.xrange(keys.dead)]
    assert raws == ["junk-a", "junk-c", "junk-d"]


def test_stats_hash_counts(writer: Writer, keys: Keys, r: redis.Redis) -> None:
    writer.write([*_entries(0, 10), parse(b"junk", 64)], CONSUMER, "")  # type: ignore[list-item]
    writer.write([*_entries(5, 15), parse(b"junk", 64)], CONSUMER, "")  # type: ignore[list-item]
    assert r.hgetall(keys.stats) == {"written": "15", "dead": "1", "skipped": "6"}


def test_unicode_and_nested_data_survive(writer: Writer, keys: Keys, r: redis.Redis) -> None:
    body = {
        "message_id": "ünï-cødé-🚀",
        "text": "héllo — 中文 — العربية — 🌍",
        "nested": {"list": [1, 2.5, None, False, {"deep": ["ÿ", {"z": []}]}], "empty": {}},
        "control": 'tab\tnewline\nquote"backslash\\',
    }
    raw = json.dumps(body, ensure_ascii=False).encode()
    message = parse(raw, 1_048_576)
    assert isinstance(message, Message)
    writer.write([output_entry(message, message.body, 1_048_576)], CONSUMER, "")
    ((_, fields),) = r.xrange(keys.output)
    assert fields["message_id"] == "ünï-cødé-🚀"
    assert json.loads(fields["data"]) == body


def test_write_after_the_connection_was_killed_is_exactly_once(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    assert writer.write(_entries(0, 20), CONSUMER, "") == WriteResult(20, 0, 0)
    assert r.client_kill_filter(_type="normal", skipme=True) >= 1
    # The writer's connection is gone: it reconnects and writes the next batch once ...
    assert writer.write(_entries(20, 40), CONSUMER, "") == WriteResult(20, 0, 0)
    r.client_kill_filter(_type="normal", skipme=True)
    # ... and a retry of a batch that had reached Redis skips all of it.
    assert writer.write(_entries(0, 40), CONSUMER, "") == WriteResult(0, 0, 40)
    assert sorted(_ids(r, keys.output)) == sorted(f"m-{index}" for index in range(40))


def test_write_after_script_flush_reloads_the_script(
    writer: Writer, keys: Keys, r: redis.Redis
) -> None:
    writer.write(_entries(0, 5), CONSUMER, "")
    r.script_flush()  # as after a Redis restart without persistence of the script cache
    assert writer.write(_entries(5, 10), CONSUMER, "") == WriteResult(5, 0, 0)
    assert r.xlen(keys.output) == 10


def test_writer_retries_until_redis_is_back(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(redis_url=private_redis.url)
    keys = Keys.from_settings(settings)
    client = command_client(settings, name="test-writer")
    results: list[WriteResult | None] = []
    try:
        writer = _writer(client, keys, settings.dedup_window_ms, "[down]")
        private_redis.stop()  # comes back on the same port, empty
        thread = threading.Thread(
            target=lambda: results.append(writer.write(_entries(0, 10), CONSUMER, ""))
        )
        thread.start()
        wait_until(lambda: "Redis (writes) unavailable" in caplog.text, timeout=10)
        assert thread.is_alive()
        private_redis.start()
        thread.join(timeout=20)
        assert not thread.is_alive()
    finally:
        client.close()
    assert results == [WriteResult(10, 0, 0)]
    check = redis.Redis.from_url(private_redis.url)
    try:
        assert check.xlen(keys.output) == 10
    finally:
        check.close()


def test_writer_gives_up_when_told_and_redis_is_down(private_redis: RedisServer) -> None:
    settings = Settings(redis_url=private_redis.url)
    client = command_client(settings, name="test-writer")
    try:
        stop = threading.Event()
        writer = Writer(
            client,
            Keys.from_settings(settings),
            settings.dedup_window_ms,
            0.2,
            tagged("[gone]"),
            stop,
            0.5,
        )
        private_redis.stop()
        stop.set()  # the consumer is shutting down: it may give up after the grace period
        started = time.monotonic()
        assert writer.write(_entries(0, 10), CONSUMER, "") is None
        assert time.monotonic() - started < 10
    finally:
        client.close()


def test_entry_kinds_are_the_script_contract() -> None:
    assert (OUTPUT, DEAD) == ("o", "d")


def test_a_write_that_times_out_is_retried_and_written_once(
    redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    # CLIENT PAUSE holds the script call past the client's socket timeout: the first call
    # times out on our side, yet Redis runs it once the pause ends; the retry must skip it.
    impatient = redis.Redis.from_url(redis_url, socket_timeout=0.3)
    writer = _writer(impatient, keys, 60_000, "t")
    entries = _entries(0, 50)
    r.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
    try:
        result = writer.write(entries, "c1", "")
    finally:
        impatient.close()
    assert result is not None
    assert _ids(r, keys.output) == [entry.dedup_id for entry in entries]
    # Either the retry wrote them (the timed-out call skipped), or the timed-out call did.
    assert result.written + result.skipped == len(entries)


def test_output_maxlen_trims_both_streams_as_they_are_written_and_still_dedups(
    client: redis.Redis, keys: Keys, settings: Settings, r: redis.Redis
) -> None:
    writer = Writer(
        client,
        keys,
        settings.dedup_window_ms,
        0.2,
        tagged("[t]"),
        threading.Event(),
        1.0,
        maxlen=100,
    )
    for start in range(0, 2000, 100):
        assert writer.write(_entries(start, start + 100), CONSUMER, "").written == 100
    dead = [parse(b"[%d]" % n, 1024) for n in range(600)]
    assert writer.write(dead, CONSUMER, "").dead == 600  # type: ignore[arg-type]
    # Approximate trimming drops whole stream nodes (100 entries each by default).
    assert 100 <= r.xlen(keys.output) < 300
    assert 100 <= r.xlen(keys.dead) < 300
    assert _ids(r, keys.output)[-1] == "m-1999"  # the newest are kept
    # Trimmed from the stream, still remembered as written.
    assert writer.write(_entries(0, 100), CONSUMER, "").skipped == 100


def test_the_set_of_a_bucket_no_longer_checked_is_unlinked_by_the_next_write(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    writer = _writer(client, keys, 600_000, "[unlink]")
    window = Window.for_ttl(600_000)
    now_bucket = int(r.time()[0] * 1000 // window.width_ms)
    stale = f"{keys.seen_prefix}{now_bucket - window.buckets_checked - 1}"
    kept = f"{keys.seen_prefix}{now_bucket - window.buckets_checked}"
    client.sadd(stale, digest("m-0"))
    client.sadd(kept, digest("m-1"))
    result = writer.write(_entries(0, 2), CONSUMER, "")
    assert result == WriteResult(written=1, dead=0, skipped=1)  # m-0 forgotten, m-1 not
    assert not r.exists(stale) and r.exists(kept)


@pytest.mark.parametrize("server", ["redis_server", "redis62"])
def test_a_write_redis_refuses_is_retried_until_it_is_taken(
    server: str, request: pytest.FixtureRequest
) -> None:
    """OOM inside the script: Redis 7 replies -OOM, Redis 6.2 wraps it in the script's error;
    either way the write waits, and is written once Redis has room."""
    url = request.getfixturevalue(server).url
    admin = redis.Redis.from_url(url)
    admin.flushall()
    client = command_client(Settings(redis_url=url), name="test-refused")
    writer = _writer(client, Keys.from_settings(Settings(redis_url=url)), 60_000, "[oom]")
    admin.config_set("maxmemory", "1")
    results: list[WriteResult | None] = []
    thread = threading.Thread(
        target=lambda: results.append(writer.write(_entries(0, 20), CONSUMER, ""))
    )
    try:
        thread.start()
        wait_until(
            lambda: admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) >= 2, 10
        )
        assert thread.is_alive() and admin.xlen("messages:processed") == 0
    finally:
        admin.config_set("maxmemory", "0")
    thread.join(10)
    assert results == [WriteResult(written=20, dead=0, skipped=0)]
    assert admin.xlen("messages:processed") == 20
    client.close()
    admin.close()


@pytest.mark.parametrize(
    "reply",
    [
        "MISCONF Errors writing to the AOF file",
        "NOREPLICAS Not enough good replicas to write.",
        "BUSY Redis is busy running a script.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "READONLY You can't write against a read only replica.",
    ],
)
def test_a_refusal_reply_is_retried_like_an_outage(client: redis.Redis, reply: str) -> None:
    """What Redis answers while it refuses writes reaches our loops as an outage to wait out,
    not as an error that ends a thread."""
    with pytest.raises(CONNECTION_ERRORS) as raised:
        client.eval(f"return redis.error_reply({reply!r})", 0)
    assert raised.value.status_code == reply.split()[0]  # type: ignore[attr-defined]


def test_an_evicting_maxmemory_policy_is_warned_about_at_start(
    client: redis.Redis, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="processor.consumer.dedup"):
        warn_if_evicting(client, cluster=False)  # Redis's default: noeviction
        assert caplog.records == []
        r.config_set("maxmemory-policy", "volatile-lru")
        try:
            warn_if_evicting(client, cluster=False)  # no maxmemory: nothing is evicted
            assert caplog.records == []
            r.config_set("maxmemory", "1gb")
            warn_if_evicting(client, cluster=False)
        finally:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "0")
    (warning,) = [logged(record) for record in caplog.records]
    assert "maxmemory-policy is volatile-lru" in warning
    assert "set maxmemory-policy noeviction" in warning


def test_a_user_without_info_skips_the_eviction_check(
    redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """ACLs written before the check lack +info: the daemon starts as before."""
    r.execute_command("ACL", "SETUSER", "no-info", "on", ">pw", "~*", "+@all", "-info")
    r.config_set("maxmemory-policy", "allkeys-lru")
    r.config_set("maxmemory", "1gb")
    user = redis.Redis.from_url(redis_url, username="no-info", password="pw")
    try:
        with caplog.at_level("WARNING", logger="processor.consumer.dedup"):
            warn_if_evicting(user, cluster=False)
    finally:
        user.close()
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "0")
        r.execute_command("ACL", "DELUSER", "no-info")
    assert caplog.records == []


def test_evicting_policies_are_read_from_one_redis_or_each_cluster_node() -> None:
    assert evicting_policies({"maxmemory_policy": "noeviction", "maxmemory": 100}) == set()
    assert evicting_policies({"maxmemory_policy": "allkeys-lru", "maxmemory": 0}) == set()
    assert evicting_policies({"maxmemory_policy": "allkeys-lru", "maxmemory": 9}) == {"allkeys-lru"}
    nodes = {
        "127.0.0.1:7000": {"maxmemory_policy": "noeviction", "maxmemory": 100},
        "127.0.0.1:7001": {"maxmemory_policy": "allkeys-lru", "maxmemory": 100},
        "127.0.0.1:7002": {"maxmemory_policy": "volatile-ttl", "maxmemory": 0},
    }
    assert evicting_policies(nodes) == {"allkeys-lru"}


def test_ids_written_before_redis_clock_stepped_back_are_still_skipped(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """A failover to a replica whose clock is behind, or an NTP step back: the sets written
    before are in buckets Redis's clock has not reached; writes go on into the newest one."""
    writer = _writer(client, keys, 600_000, "[clock]")
    window = Window.for_ttl(600_000)
    now_bucket = int(r.time()[0] * 1000 // window.width_ms)
    ahead = now_bucket + window.buckets_checked + 1  # the furthest step back that is followed
    # What the old primary left: m-0 written in a bucket its clock had reached, and the clock.
    client.sadd(f"{keys.seen_prefix}{ahead}", digest("m-0"))
    r.set(keys.single.seen_clock, ahead)
    result = writer.write(_entries(0, 2), CONSUMER, "")
    assert result == WriteResult(written=1, dead=0, skipped=1)
    assert client.smembers(f"{keys.seen_prefix}{ahead}") == {digest("m-0"), digest("m-1")}
    seen = SeenCheck(client, keys, window).seen(["m-0", "m-1", "m-2"])
    assert seen == [True, True, False]
    assert r.get(keys.single.seen_clock) == str(ahead)


def test_a_bucket_clock_further_ahead_than_the_window_is_dropped(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """A clock that far ahead was wrong, not stepped back: following it would pile every write
    into one set until Redis's clock caught up."""
    writer = _writer(client, keys, 600_000, "[clock]")
    window = Window.for_ttl(600_000)
    before = int(r.time()[0] * 1000 // window.width_ms)
    r.set(keys.single.seen_clock, before + window.buckets_checked + 3)
    assert writer.write(_entries(0, 1), CONSUMER, "") == WriteResult(1, 0, 0)
    after = int(r.time()[0] * 1000 // window.width_ms)
    bucket = int(r.get(keys.single.seen_clock) or 0)
    assert before <= bucket <= after
    assert client.smembers(f"{keys.seen_prefix}{bucket}") == {digest("m-0")}


def test_both_dedup_scripts_run_the_one_bucket_fragment_under_their_composed_sha(
    client: redis.Redis, keys: Keys, r: redis.Redis
) -> None:
    """bucket.lua (the current bucket and the lookups in the bucket sets) is written once and
    put into both scripts when they are loaded; Redis knows each by its composed source."""
    fragment = load_script("bucket.lua")
    composed = {name: load_script(name) for name in ("dedup_append.lua", "seen.lua")}
    for name, source in composed.items():
        assert source.count(fragment) == 1, name
        assert not re.search(r"^-- include:", source, re.MULTILINE), name
    writer = _writer(client, keys, 60_000, "[fragment]")
    assert writer.write(_entries(0, 2), CONSUMER, "") == WriteResult(2, 0, 0)
    assert SeenCheck(client, keys, Window.for_ttl(60_000)).seen(["m-1", "m-2"]) == [True, False]
    shas = [hashlib.sha1(source.encode()).hexdigest() for source in composed.values()]
    assert r.script_exists(*shas) == [True, True]


def test_a_write_no_replica_confirms_is_kept_and_later_writes_stop_waiting_for_a_while(
    client: redis.Redis, keys: Keys, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """WAIT_REPLICAS on a Redis without replicas: the write stands (it is on the primary), one
    warning says the partition is unprotected, and the next writes do not wait again."""
    writer = Writer(
        client, keys, 60_000, 0.2, tagged("[t]"), threading.Event(), 1.0, wait_replicas=1
    )
    with caplog.at_level("WARNING", logger="processor.consumer.writer"):
        for start in range(0, 30, 10):
            result = writer.write(_entries(start, start + 10), CONSUMER, "")
            assert result is not None and result.written == 10
    assert _ids(r, keys.output) == [f"m-{index}" for index in range(30)]
    warnings = [logged(record) for record in caplog.records]
    assert len(warnings) == 1, warnings
    assert "0 of 1 replicas confirmed a write to messages:processed" in warnings[0]
