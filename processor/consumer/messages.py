"""What a payload from the channel becomes: a valid message, or a dead letter with a reason.

Pure functions, no Redis: the contract for input and output lives here. JSON goes through
orjson (strict RFC 8259: NaN, Infinity and integers beyond 64 bits are invalid).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

OUTPUT = "o"
DEAD = "d"
# orjson reads 1,024 levels of nesting but writes only 254: one limit for both, checked on
# input, so a message we accept is one we can write.
MAX_DEPTH = 254


# Tuples rather than dataclasses: these are built for every message on the hot path.
class Entry(NamedTuple):
    """One entry for the write script: an output message (``data``) or a dead letter
    (``reason``, its ``code``, ``raw`` and the ``message_id`` when it had one), with the id it
    is deduplicated by."""

    kind: str
    dedup_id: str
    data: str | bytes = ""  # an output's JSON
    reason: str = ""  # a dead letter's reason, for people
    raw: bytes = b""  # a dead letter's payload as received (cut at MAX_MESSAGE_BYTES)
    code: str = ""  # a dead letter's reason code: reason_kind(reason), the metric's label
    message_id: str = ""  # a dead letter's message_id, "" when it had none


class Message(NamedTuple):
    """A payload that passed validation: its id, the parsed object and the bytes received."""

    message_id: str
    body: dict[str, Any]
    raw: bytes


def payload_dedup_id(raw: bytes) -> str:
    """Dedup id for a payload with no usable message_id: identical payloads share it."""
    return "#sha1:" + hashlib.sha1(raw).hexdigest()


def dead_letter(reason: str, raw: bytes, max_bytes: int, message_id: str = "") -> Entry:
    """A dead letter, deduplicated by its ``message_id`` or, without one, by its payload."""
    return Entry(
        DEAD,
        message_id or payload_dedup_id(raw),
        reason=reason,
        raw=raw[:max_bytes],
        code=reason_kind(reason),
        message_id=message_id,
    )


def parse(raw: bytes, max_bytes: int) -> Message | Entry:
    """The message in ``raw``, or the dead-letter entry that says why it is not one."""
    if len(raw) > max_bytes:
        return dead_letter(f"oversized: {len(raw)} bytes > limit {max_bytes}", raw, max_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad_byte:
            return dead_letter(f"invalid UTF-8 at byte {bad_byte.start}", raw, max_bytes)
        return dead_letter(f"invalid JSON: {error}", raw, max_bytes)
    if not isinstance(body, dict):
        return dead_letter(f"not a JSON object: {type(body).__name__}", raw, max_bytes)
    message_id = body.get("message_id")
    if message_id is None:
        return dead_letter("missing message_id", raw, max_bytes)
    if not isinstance(message_id, str):
        return dead_letter(
            f"message_id is not a string: {type(message_id).__name__}", raw, max_bytes
        )
    if not message_id:
        return dead_letter("empty message_id", raw, max_bytes)
    # Nesting needs one bracket per level: most payloads are cleared by a count in C.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        return dead_letter(
            f"nested deeper than {MAX_DEPTH} levels", raw, max_bytes, message_id=message_id
        )
    return Message(message_id, body, raw)


def _deeper_than(body: dict[str, Any], limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels (``body`` is level 1)."""
    # A loop, not recursion: orjson's 1,024 levels are past Python's recursion limit.
    pending: list[tuple[dict[str, Any] | list[Any], int]] = [(body, 1)]
    while pending:
        container, depth = pending.pop()
        children = container.values() if isinstance(container, dict) else container
        for child in children:
            if isinstance(child, dict | list):
                if depth == limit:
                    return True
                pending.append((child, depth + 1))
    return False


def output_entry(message: Message, processed: object, max_bytes: int) -> Entry:
    """The output entry for a handler's result, or a dead letter if it cannot be stored."""
    if not isinstance(processed, dict):
        return handler_failed(
            message, f"handler returned {type(processed).__name__}, not a dict", max_bytes
        )
    try:
        data = orjson.dumps(processed)
    except TypeError as error:
        return handler_failed(message, f"handler result is not JSON: {error}", max_bytes)
    return Entry(OUTPUT, message.message_id, data)


def handler_failed(message: Message, reason: str, max_bytes: int) -> Entry:
    """A dead letter for a valid message the handler could not process; deduplicated by its id."""
    return dead_letter(reason, message.raw, max_bytes, message_id=message.message_id)


# Dead-letter reasons grouped into a few kinds, for a metric label of bounded cardinality: the
# reason codes, written into each dead letter as ``reason_code`` too.
_REASON_KINDS = (
    ("oversized", "oversized"),
    ("invalid UTF-8", "invalid_utf8"),
    ("invalid JSON", "invalid_json"),
    ("not a JSON object", "not_an_object"),
    ("missing message_id", "missing_message_id"),
    ("message_id is not", "bad_message_id"),
    ("empty message_id", "bad_message_id"),
    ("nested deeper than", "too_deep"),
    ("handler raised", "handler_error"),
    ("handler timed out", "handler_timeout"),
    ("handler returned", "handler_result"),
    ("handler result", "handler_result"),
)


# Every kind, in the order above, and the catch-all: the dead-letter metric's labels exist from
# the start, and a dead letter's reason_code is one of them.
REASON_CODES = (*dict.fromkeys(kind for _, kind in _REASON_KINDS), "other")
# What a handler's failure is dead-lettered as; the others fail validation, so the same payload
# sent again would fail again.
HANDLER_CODES = ("handler_error", "handler_timeout", "handler_result")


def reason_kind(reason: str | bytes) -> str:
    """The kind of a dead-letter reason: ``invalid_json``, ``handler_error``..."""
    text = reason.decode(errors="replace") if isinstance(reason, bytes) else reason
    for prefix, kind in _REASON_KINDS:
        if text.startswith(prefix):
            return kind
    return "other"


def parse_all(
    payloads: Sequence[bytes], max_bytes: int
) -> tuple[list[Entry | None], list[tuple[int, Message]]]:
    """Each payload's dead letter (or None, its place kept), and the valid messages with their
    positions, so the handler's results go back in the order received."""
    entries: list[Entry | None] = []
    messages: list[tuple[int, Message]] = []
    for payload in payloads:
        parsed = parse(payload, max_bytes)
        if isinstance(parsed, Message):
            messages.append((len(entries), parsed))
            entries.append(None)
        else:
            entries.append(parsed)
    return entries, messages
