"""``processor replay``: chosen dead letters published again to the channel, exactly once still.

Once the handler is fixed, the payloads of the dead letters it failed on go back to
``INPUT_CHANNEL``; the live consumers process them as any message. Each dead letter is replayed
by one call of ``replay.lua``, which forgets its message_id in the dedup window only when nothing
was written for that id since the dead letter (the script says why that keeps exactly once),
publishes the payload, and deletes the entry once a subscriber received it. A replay the handler
fails on again is dead-lettered again, as a new entry.

Only what would pass validation is replayed: a payload that failed it (bad JSON, no
message_id, too large or too deep) would fail it again. Pub/Sub drops a message nobody is
subscribed to, so with no live consumer nothing is published; a publish that reached no
subscriber all the same leaves its entry where it was.

Each outcome is printed as its script call returns. SIGINT or SIGTERM stops the run between two
dead letters (:mod:`processor.commands.interrupt`): what was replayed has been said, the rest is
left in the stream, and the exit code names the signal.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

import redis

from processor.commands.deadletters import (
    DeadLetter,
    by_reason,
    dead_letter,
    reason_code,
    select,
)
from processor.commands.interrupt import Interrupt
from processor.commands.replay_report import (
    GONE,
    NOT_RECEIVED,
    NOT_REPLAYABLE,
    REPLAYED,
    Outcome,
    Report,
)
from processor.config import GroupSettings
from processor.consumer.dedup import BUCKETS_CHECKED, digest
from processor.consumer.messages import Message, parse
from processor.errors import ExitCode
from processor.loading import load_group_command
from processor.store.connection import CONNECTION_ERRORS, command_session, explain
from processor.store.keys import Keys
from processor.store.keytypes import named_wrong_type, replay_types
from processor.store.scripts import Script

# How long a replay's record of the ids it forgot is kept after the last one: the record must
# outlive the dedup window (1.5 x DEDUP_WINDOW_MS at most; ten minutes by default).
RECORD_TTL_MS = 7 * 24 * 3600 * 1000
# A payload is published as it was received: whatever its size, the consumers judge it.
_NO_LIMIT = 1 << 62
_ENTRY_ID = re.compile(r"\d+-\d+")

# What a Redis user needs for ``processor replay`` beyond the daemon's (ACL_RULES in
# processor/store/access.py); +spublish instead of +publish on a cluster.
ACL_RULES = "+publish +xrange +xdel +srem +exists"


def live_consumers(client: redis.Redis, keys: Keys) -> int:
    """Consumers in the group whose heartbeat has not expired."""
    ids: list[bytes] = client.lrange(keys.consumers, 0, -1)  # type: ignore[assignment]
    if not ids:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for consumer_id in ids:
            pipe.exists(keys.heartbeat(consumer_id.decode()))
        return sum(pipe.execute())


class Replayer:
    """Replays dead letters through ``replay.lua``, one call each."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._script = Script(client, "replay.lua", ("stream", "string", "hash"))

    def replay(self, letter: DeadLetter) -> Outcome:
        parsed = parse(letter.raw, _NO_LIMIT)
        if not isinstance(parsed, Message):
            return Outcome(letter.entry_id, letter.message_id, letter.reason_code, NOT_REPLAYABLE)
        part = self._keys.partitions[letter.partition]
        receivers, forgotten = self._script(
            keys=[part.dead, part.seen_clock, part.replayed],
            args=[
                letter.entry_id,
                # The id the consumers deduplicate by: the payload's, whatever the entry says.
                digest(parsed.message_id),
                part.seen_prefix,
                BUCKETS_CHECKED,
                part.channel,
                "SPUBLISH" if self._keys.cluster else "PUBLISH",
                RECORD_TTL_MS,
            ],
        )
        receivers = int(receivers)
        if receivers < 0:
            return Outcome(letter.entry_id, parsed.message_id, letter.reason_code, GONE)
        outcome = REPLAYED if receivers else NOT_RECEIVED
        return Outcome(
            letter.entry_id,
            parsed.message_id,
            letter.reason_code,
            outcome,
            receivers,
            bool(forgotten),
        )


def by_entry_ids(client: redis.Redis, keys: Keys, entry_ids: Sequence[str]) -> list[DeadLetter]:
    """The dead letters with these entry ids (any partition); an id not found is GONE."""
    found: list[DeadLetter] = []
    for entry_id in entry_ids:
        for partition, part in enumerate(keys.partitions):
            entries: list[Any] = client.xrange(part.dead, entry_id, entry_id)  # type: ignore[assignment]
            for key, fields in entries:
                found.append(dead_letter(key, fields, partition))
    return found


def _entry_id(text: str) -> str:
    if not _ENTRY_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a stream entry id (like 1764756104123-0)"
        )
    return text


def _arguments(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--id",
        dest="entry_ids",
        action="append",
        type=_entry_id,
        metavar="ENTRY_ID",
        help="a dead letter's stream entry id, as 'processor dead-letters' shows it (repeatable)",
    )
    choice.add_argument(
        "--message-id",
        dest="message_ids",
        action="append",
        metavar="ID",
        help="every dead letter of this message_id (repeatable)",
    )
    choice.add_argument("--reason", type=reason_code, help="every dead letter with this code")
    choice.add_argument("--all", action="store_true", help="every dead letter")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _chosen(client: redis.Redis, keys: Keys, args: argparse.Namespace) -> list[DeadLetter]:
    """The dead letters the arguments name, oldest first: replayed in the order they failed."""
    if args.entry_ids:
        return by_entry_ids(client, keys, args.entry_ids)
    if args.message_ids:
        wanted = set(args.message_ids)
        letters = select(client, keys, lambda letter: _message_id(letter) in wanted)
    else:
        letters = select(client, keys, by_reason(args.reason))
    return letters[::-1]


def _message_id(letter: DeadLetter) -> str:
    """The entry's message_id, read from the payload for entries written without the field."""
    if letter.message_id:
        return letter.message_id
    parsed = parse(letter.raw, _NO_LIMIT)
    return parsed.message_id if isinstance(parsed, Message) else ""


def replay_chosen(
    client: redis.Redis, keys: Keys, args: argparse.Namespace, interrupt: Interrupt, report: Report
) -> str | None:
    """Replays each chosen dead letter into ``report``, until ``interrupt`` says to stop; or why
    none was published."""
    if not live_consumers(client, keys):
        return "no live consumer: Pub/Sub would drop the replays; start the daemon first"
    letters = _chosen(client, keys, args)
    report.begin(len(letters))
    replayer = Replayer(client, keys)
    for letter in letters:
        # Between two script calls: every dead letter is replayed whole, or not at all.
        if interrupt.signal is not None:
            return None
        report.add(replayer.replay(letter))
    # What was named and not found is reported, not passed over.
    entry_ids = {outcome.entry_id for outcome in report.outcomes}
    message_ids = {outcome.message_id for outcome in report.outcomes}
    for entry_id in args.entry_ids or ():
        if entry_id not in entry_ids:
            report.add(Outcome(entry_id, "", "-", GONE))
    for message_id in args.message_ids or ():
        if message_id not in message_ids:
            report.add(Outcome("-", message_id, "-", GONE))
    return None


def main(argv: Sequence[str], prog: str) -> int:
    description = (
        "Publish chosen dead letters again to INPUT_CHANNEL, once the handler is fixed; exactly "
        "once still holds. Refused with no live consumer. SIGINT or SIGTERM stops it between "
        "two dead letters, saying what was replayed."
    )
    settings, args = load_group_command(argv, prog, description, _arguments)
    interrupt = Interrupt().install()
    # What failed validation is left quietly by --reason and --all, not when named.
    report = Report(args.json, named=bool(args.entry_ids or args.message_ids))
    try:
        failed = _replay(settings, args, interrupt, report, prog)
    finally:
        # What was replayed is said however the run ended: a signal, an error, or the last one.
        report.close(interrupt.signal)
    if failed is not None:
        return failed
    return interrupt.exit_code() or (ExitCode.NOT_REPLAYED if report.missed() else ExitCode.OK)


def _replay(
    settings: GroupSettings,
    args: argparse.Namespace,
    interrupt: Interrupt,
    report: Report,
    prog: str,
) -> ExitCode | None:
    """Replays what ``args`` chose; the exit code when that failed (one line said why). A key
    of the wrong type is raised as the ConfigError naming it."""
    try:
        keys = Keys.from_settings(settings)
        with (
            command_session(settings, "processor-replay", 5.0) as client,
            named_wrong_type(client, keys, replay_types(keys)),
        ):
            refused = replay_chosen(client, keys, args, interrupt, report)
    except CONNECTION_ERRORS as error:
        print(
            f"{prog}: error: cannot replay from {settings.safe_url}: "
            f"{explain(error, settings.url)}",
            file=sys.stderr,
        )
        return ExitCode.UNREACHABLE
    except redis.ResponseError as error:
        hint = ""
        if isinstance(error, redis.exceptions.NoPermissionError):
            hint = f" (replay needs, beyond the daemon's permissions: {ACL_RULES})"
        print(f"{prog}: error: Redis refused the command: {error}{hint}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    if refused is not None:
        print(f"{prog}: error: {refused}", file=sys.stderr)
        return ExitCode.NOT_REPLAYED
    return None
