"""``processor dead-letters``: the recent dead letters, newest first; and how they are read.

A dead letter is an entry of ``DEAD_LETTER_STREAM`` (one per partition on a cluster) with the
fields the write script gives it: ``reason_code`` (the metric's label), ``reason``, ``raw``,
``consumer_id``, ``time`` and ``message_id`` when the message had one. Entries written before
those fields existed are read too: their code is worked out from the reason, their time from the
entry id. ``processor replay`` (:mod:`processor.commands.replay`) selects with the same reader.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from processor.consumer.messages import REASON_CODES, reason_kind
from processor.errors import ExitCode
from processor.loading import count_arg, load_group_command
from processor.store.connection import CONNECTION_ERRORS, command_session, explain
from processor.store.keys import Keys
from processor.store.keytypes import dead_letter_types, named_wrong_type

DEFAULT_COUNT = 20
# Entries read per XREVRANGE while looking for matches.
PAGE = 500
REASON_WIDTH = 100


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str
    partition: int
    time: str  # UTC ISO-8601 (the consumer's clock), or the entry id's time for older entries
    reason_code: str
    reason: str
    message_id: str  # "" when the message had none
    consumer_id: str
    raw: bytes

    def as_json(self) -> dict[str, Any]:
        """For ``--json``: ``raw`` as text (bytes that are not UTF-8 escaped as ``\\xNN``)."""
        return {
            "entry_id": self.entry_id,
            "partition": self.partition,
            "time": self.time,
            "reason_code": self.reason_code,
            "reason": self.reason,
            "message_id": self.message_id or None,
            "consumer_id": self.consumer_id,
            "raw": self.raw.decode("utf-8", "backslashreplace"),
        }


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


def _entry_time(entry_id: str) -> str:
    milliseconds = int(entry_id.partition("-")[0])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(milliseconds // 1000))
    return f"{stamp}.{milliseconds % 1000:03d}Z"


def dead_letter(entry_id: bytes | str, fields: dict[bytes, bytes], partition: int) -> DeadLetter:
    """One stream entry as a dead letter."""
    key = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    reason = _text(fields.get(b"reason"))
    return DeadLetter(
        entry_id=key,
        partition=partition,
        time=_text(fields.get(b"time")) or _entry_time(key),
        reason_code=_text(fields.get(b"reason_code")) or reason_kind(reason),
        reason=reason,
        message_id=_text(fields.get(b"message_id")),
        consumer_id=_text(fields.get(b"consumer_id")),
        raw=fields.get(b"raw", b""),
    )


def _newest_first(client: redis.Redis, stream: str, partition: int) -> Iterator[DeadLetter]:
    """A partition's dead letters from the newest, a page at a time."""
    upper = "+"
    while True:
        page: list[Any] = client.xrevrange(stream, max=upper, count=PAGE)  # type: ignore[assignment]
        for entry_id, fields in page:
            yield dead_letter(entry_id, fields, partition)
        if len(page) < PAGE:
            return
        upper = "(" + page[-1][0].decode()  # exclusive (Redis 6.2+): from the one before it


def _order(letter: DeadLetter) -> tuple[int, int]:
    milliseconds, _, sequence = letter.entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def select(
    client: redis.Redis,
    keys: Keys,
    wanted: Callable[[DeadLetter], bool],
    limit: int | None = None,
) -> list[DeadLetter]:
    """The dead letters ``wanted`` keeps, newest first (by entry id, across partitions), at most
    ``limit``; the streams are read from their newest entry until enough are found."""
    found: list[DeadLetter] = []
    for partition, part in enumerate(keys.partitions):
        matches = (
            letter for letter in _newest_first(client, part.dead, partition) if wanted(letter)
        )
        for count, letter in enumerate(matches, start=1):
            found.append(letter)
            if limit is not None and count >= limit:
                break
    found.sort(key=_order, reverse=True)
    return found if limit is None else found[:limit]


def by_reason(code: str | None) -> Callable[[DeadLetter], bool]:
    return lambda letter: code is None or letter.reason_code == code


def render(letters: Sequence[DeadLetter]) -> str:
    """A table for a person at a terminal: one line per dead letter, its reason cut short."""
    if not letters:
        return "no dead letters"
    rows = [("ENTRY", "TIME (UTC)", "REASON CODE", "MESSAGE ID", "REASON")]
    for letter in letters:
        reason = letter.reason
        if len(reason) > REASON_WIDTH:
            reason = reason[: REASON_WIDTH - 3] + "..."
        rows.append(
            (letter.entry_id, letter.time, letter.reason_code, letter.message_id or "-", reason)
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def reason_code(text: str) -> str:
    """argparse's check of ``--reason``: one of the codes the metric's label takes."""
    if text not in REASON_CODES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a reason code (choose from {', '.join(REASON_CODES)})"
        )
    return text


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--count",
        type=count_arg,
        default=DEFAULT_COUNT,
        help=f"how many to show, newest first (default {DEFAULT_COUNT})",
    )
    parser.add_argument(
        "--reason", type=reason_code, help=f"only this reason code: {', '.join(REASON_CODES)}"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def main(argv: Sequence[str], prog: str) -> int:
    description = "List the recent dead letters, newest first; read only."
    settings, args = load_group_command(argv, prog, description, _arguments)
    try:
        keys = Keys.from_settings(settings)
        with (
            command_session(settings, "processor-dead-letters", 5.0) as client,
            named_wrong_type(client, keys, dead_letter_types(keys)),
        ):
            letters = select(client, keys, by_reason(args.reason), args.count)
    except CONNECTION_ERRORS as error:
        print(
            f"{prog}: error: cannot read the dead letters from {settings.safe_url}: "
            f"{explain(error, settings.url)}",
            file=sys.stderr,
        )
        return ExitCode.UNREACHABLE
    except redis.ResponseError as error:
        print(f"{prog}: error: Redis refused the command: {error}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters], indent=2))
    else:
        print(render(letters))
    return ExitCode.OK
