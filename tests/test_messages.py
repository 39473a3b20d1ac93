"""The input contract: what parses, what is dead-lettered and why, and the output entry."""

from __future__ import annotations

import json

import orjson
import pytest

from processor.consumer.messages import (
    DEAD,
    MAX_DEPTH,
    OUTPUT,
    Entry,
    Message,
    handler_failed,
    output_entry,
    parse,
    payload_dedup_id,
    reason_kind,
)
from processor.handlers import add_random_score

LIMIT = 1024


def _dead(raw: bytes, limit: int = LIMIT) -> Entry:
    parsed = parse(raw, limit)
    assert isinstance(parsed, Entry), parsed
    assert parsed.kind == DEAD
    return parsed


def test_valid_message_is_parsed() -> None:
    raw = b'{"message_id":"m-1","text":"hi","n":3}'
    parsed = parse(raw, LIMIT)
    assert isinstance(parsed, Message)
    assert parsed.message_id == "m-1"
    assert parsed.body == {"message_id": "m-1", "text": "hi", "n": 3}
    assert parsed.raw == raw


def test_message_exactly_at_the_limit_is_valid() -> None:
    raw = json.dumps({"message_id": "m", "pad": ""}).encode()
    raw = json.dumps({"message_id": "m", "pad": "x" * (LIMIT - len(raw))}).encode()
    assert len(raw) == LIMIT
    assert isinstance(parse(raw, LIMIT), Message)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json at all", "invalid JSON"),
        (b"", "invalid JSON"),
        (b'{"message_id": "m-1"', "invalid JSON"),
        (b"[1, 2, 3]", "not a JSON object: list"),
        (b'"just a string"', "not a JSON object: str"),
        (b"42", "not a JSON object: int"),
        (b"null", "not a JSON object: NoneType"),
        (b'{"text": "no id"}', "missing message_id"),
        (b'{"message_id": null}', "missing message_id"),
        (b'{"message_id": ""}', "empty message_id"),
        (b'{"message_id": 17}', "message_id is not a string: int"),
        (b'{"message_id": ["a"]}', "message_id is not a string: list"),
        (b'{"message_id": "m-\xff"}', "invalid UTF-8 at byte 18"),
    ],
)
def test_invalid_payloads_become_dead_letters(raw: bytes, reason: str) -> None:
    entry = _dead(raw)
    assert reason in entry.reason
    assert entry.raw == raw  # the payload as received
    assert entry.dedup_id == payload_dedup_id(raw)


def test_oversized_payload_is_dead_lettered_and_truncated() -> None:
    raw = json.dumps({"message_id": "big", "pad": "x" * 500}).encode()
    entry = _dead(raw, limit=100)
    assert "oversized" in entry.reason
    assert str(len(raw)) in entry.reason
    assert entry.raw == raw[:100]
    assert len(entry.raw) == 100
    # Keyed by the whole payload: two big payloads sharing their first 100 bytes stay distinct.
    other = _dead(raw[:-2] + b'y"}', limit=100)
    assert other.raw == entry.raw
    assert other.dedup_id != entry.dedup_id


def test_identical_invalid_payloads_share_a_dedup_id() -> None:
    first = _dead(b"garbage")
    second = _dead(b"garbage")
    different = _dead(b"garbage!")
    assert first.dedup_id == second.dedup_id
    assert first.dedup_id != different.dedup_id
    assert first.dedup_id.startswith("#sha1:")


def test_unicode_and_nested_values_round_trip_through_output_entry() -> None:
    original = {
        "message_id": "id-ü-😀",
        "text": "héllo wörld — 中文 — emoji 🌍",
        "nested": {"list": [1, 2.5, None, True, {"deep": ["x", {"y": "ÿ"}]}], "empty": {}},
        "escapes": 'quote " backslash \\ newline \n tab \t nul \u0000',
        "big": 2**62,
    }
    raw = json.dumps(original, ensure_ascii=False).encode("utf-8")
    parsed = parse(raw, 1_048_576)
    assert isinstance(parsed, Message)
    assert parsed.body == original
    processed = add_random_score(dict(parsed.body))
    entry = output_entry(parsed, processed, 1_048_576)
    assert entry.kind == OUTPUT
    assert entry.dedup_id == "id-ü-😀"
    decoded = json.loads(entry.data)
    assert decoded == processed
    added = set(decoded) - set(original)
    assert len(added) == 1
    assert {key: decoded[key] for key in original} == original


def test_handler_result_that_is_not_a_dict_is_dead_lettered_by_message_id() -> None:
    parsed = parse(b'{"message_id":"m-7"}', LIMIT)
    assert isinstance(parsed, Message)
    entry = output_entry(parsed, ["not", "a", "dict"], LIMIT)
    assert entry.kind == DEAD
    assert entry.dedup_id == "m-7"  # a valid message is locked by its id, dead or not
    assert "list" in entry.reason
    assert entry.raw == parsed.raw


def test_handler_result_that_is_not_json_is_dead_lettered() -> None:
    parsed = parse(b'{"message_id":"m-8"}', LIMIT)
    assert isinstance(parsed, Message)
    entry = output_entry(parsed, {"message_id": "m-8", "when": object()}, LIMIT)
    assert entry.kind == DEAD
    assert "not JSON" in entry.reason
    assert entry.dedup_id == "m-8"


def test_handler_failed_truncates_raw_and_keeps_the_reason() -> None:
    raw = json.dumps({"message_id": "m-9", "pad": "z" * 200}).encode()
    parsed = parse(raw, 1024)
    assert isinstance(parsed, Message)
    entry = handler_failed(parsed, "handler raised ValueError: boom", 64)
    assert entry == Entry(
        DEAD,
        "m-9",
        reason="handler raised ValueError: boom",
        raw=raw[:64],
        code="handler_error",
        message_id="m-9",
    )


def _nested(depth: int) -> bytes:
    """A message whose arrays and objects nest ``depth`` levels, the message itself included."""
    levels = depth - 1
    opening = "".join('{"a":' if n % 2 else "[" for n in range(levels))
    closing = "".join("}" if n % 2 else "]" for n in reversed(range(levels)))
    return f'{{"message_id":"deep","x":{opening}0{closing}}}'.encode()


def _depth_of(raw: bytes) -> int:
    depth = deepest = 0
    for byte in raw:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH])
def test_a_message_nested_to_the_limit_is_valid_and_its_output_is_written(depth: int) -> None:
    raw = _nested(depth)
    assert _depth_of(raw) == depth
    parsed = parse(raw, 1_048_576)
    assert isinstance(parsed, Message)
    entry = output_entry(parsed, add_random_score(parsed.body), 1_048_576)
    assert entry.kind == OUTPUT


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300, 1024])
def test_a_message_nested_past_what_can_be_written_is_dead_lettered_on_input(depth: int) -> None:
    raw = _nested(depth)
    assert _depth_of(raw) == depth
    entry = _dead(raw, limit=1_048_576)
    assert entry.reason == f"nested deeper than {MAX_DEPTH} levels"
    assert reason_kind(entry.reason) == "too_deep"
    assert entry.dedup_id == "deep"  # a valid id: deduplicated by it, as a handler failure is
    assert (entry.message_id, entry.code) == ("deep", "too_deep")
    assert entry.raw == raw


def test_brackets_in_strings_and_wide_structures_are_not_depth() -> None:
    brackets = json.dumps({"message_id": "m", "text": "[{" * 500}).encode()
    wide = json.dumps({"message_id": "m", "rows": [{"n": [n]} for n in range(500)]}).encode()
    for raw in (brackets, wide):
        assert isinstance(parse(raw, 1_048_576), Message)


def test_the_depth_limit_is_what_orjson_writes() -> None:
    # If orjson's limit moves, MAX_DEPTH must follow it.
    at_limit = parse(_nested(MAX_DEPTH), 1_048_576)
    assert isinstance(at_limit, Message)
    orjson.dumps(at_limit.body)
    past_limit = orjson.loads(_nested(MAX_DEPTH + 1))
    with pytest.raises(orjson.JSONEncodeError, match="Recursion limit"):
        orjson.dumps(past_limit)
