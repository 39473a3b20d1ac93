"""``processor status``: a one-shot view of the whole group, read from Redis and changing nothing.

The control plane comes first: the desired size and who set it, a pending group stop, the last
autoscale decision, and every live host with its share, what it runs and its shortfall.

Live consumers come from ``CONSUMERS_LIST`` and their heartbeat keys (an id whose heartbeat has
expired is shown as dead, not pruned: status only reads); each consumer's status hash, refreshed
with every heartbeat, gives its host, pid, strategy, rate and counters.

A key of the group that holds another type than the daemon writes there is named at the top, in
the daemon's start-up words, and the rest is shown: status is what an operator runs to find out
what is wrong (exit code 2 then).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import redis

from processor.config import StatusSettings
from processor.errors import ExitCode, NotACount, WrongType
from processor.group.controlplane import Control, HostInfo, read_control
from processor.loading import load_status_settings
from processor.observe.counters import COUNTERS, UNWRITTEN, read_counters
from processor.store.connection import CONNECTION_ERRORS, command_session, explain
from processor.store.keys import Keys
from processor.store.keytypes import wrong_types

RECENT = 5
T = TypeVar("T")


@dataclass
class ConsumerView:
    consumer_id: str
    registered_ms: int
    host: str = "?"
    pid: int = 0
    strategy: str = "?"
    # "reader" (subscribes; "feeds" consumers) or "fed" (fed by a reader of its host).
    role: str = "reader"
    feeds: int = 0
    rate: float = 0.0
    beat_ms: int = 0
    written: int = 0
    dead: int = 0
    received: int = 0
    buffered: int = 0
    held: int = 0
    gaps: int = 0
    subscribed: bool = False
    backlog_bytes: int = 0
    # A fed consumer whose reader handles its messages itself (SPREAD=auto, a cheap handler).
    standby: bool = False


@dataclass
class GroupView:
    url: str
    now_ms: int
    consumers: list[ConsumerView] = field(default_factory=list)
    written: int = 0
    dead: int = 0
    skipped: int = 0
    # What consumers held unwritten when they exited: lost, or tried by the others.
    lost: int = 0
    left_to_takeover: int = 0
    streams: dict[str, int] = field(default_factory=dict)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    control: Control = field(default_factory=Control)
    hosts: list[HostInfo] = field(default_factory=list)
    # A line for each key of the group that holds another type than the daemon writes there.
    wrong_types: list[str] = field(default_factory=list)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _int(value: bytes | str | None) -> int:
    try:
        return int(float(_text(value) or 0))
    except ValueError:
        return 0


def _stream_id(entry_id: bytes | str) -> tuple[int, int]:
    milliseconds, _, sequence = _text(entry_id).partition("-")
    return int(milliseconds), int(sequence or 0)


def _unless_wrong_type(read: Callable[[], T], otherwise: T) -> T:
    """What ``read`` returns, or ``otherwise`` when a key it reads holds another type: the view
    names that key and shows the rest (status is what an operator runs to see what is wrong)."""
    try:
        return read()
    except WrongType:
        return otherwise


def _reply(reply: Any, otherwise: Any) -> Any:
    """A pipeline's reply, or ``otherwise`` for a key of another type (as above)."""
    if isinstance(reply, WrongType):
        return otherwise
    if isinstance(reply, Exception):
        raise reply
    return reply


def read_group(client: redis.Redis, settings: StatusSettings) -> GroupView:
    """Everything the view shows, in a few round trips; never writes."""
    keys = Keys.from_settings(settings)
    view = GroupView(url=settings.safe_url, now_ms=int(time.time() * 1000))
    view.wrong_types = list(wrong_types(client, keys).values())
    nobody: list[bytes | str] = []
    listed = _unless_wrong_type(lambda: client.lrange(keys.consumers, 0, -1), nobody)
    ids = [_text(item) for item in listed]
    with client.pipeline(transaction=False) as pipe:
        for consumer_id in ids:
            pipe.get(keys.heartbeat(consumer_id))
            pipe.hgetall(keys.info(consumer_id))
        pipe.xrevrange(keys.gaps, count=RECENT)
        for partition in keys.partitions:
            pipe.xlen(partition.output)
            pipe.xlen(partition.dead)
            pipe.xrevrange(partition.dead, count=RECENT)
        replies: list[Any] = pipe.execute(raise_on_error=False)
    counters = dict.fromkeys((*COUNTERS, *UNWRITTEN), 0)
    try:
        counters = read_counters(client, keys)
    except NotACount as error:
        view.wrong_types.append(error.problem())
    except WrongType:
        pass  # the stats hash holds another type: wrong_types names it
    for index, consumer_id in enumerate(ids):
        heartbeat, info = _reply(replies[2 * index], None), _reply(replies[2 * index + 1], {})
        if heartbeat is None:
            continue  # expired: dead, pruned by the next live heartbeat
        info = {_text(name): value for name, value in info.items()}
        view.consumers.append(
            ConsumerView(
                consumer_id=consumer_id,
                registered_ms=_int(_text(heartbeat).rpartition(":")[2]),
                host=_text(info.get("host")) or "?",
                pid=_int(info.get("pid")),
                strategy=_text(info.get("strategy")) or "?",
                role=_text(info.get("role")) or "reader",
                feeds=_int(info.get("feeds")),
                rate=float(_text(info.get("rate")) or 0),
                beat_ms=_int(info.get("beat_ms")),
                written=_int(info.get("written")),
                dead=_int(info.get("dead")),
                received=_int(info.get("received")),
                buffered=_int(info.get("buffered")),
                held=_int(info.get("held")),
                gaps=_int(info.get("gaps")),
                subscribed=_int(info.get("subscribed")) == 1,
                backlog_bytes=_int(info.get("backlog_bytes")),
                standby=_int(info.get("standby")) == 1,
            )
        )
    gaps, *per_partition = replies[2 * len(ids) :]
    gaps = _reply(gaps, [])
    view.written, view.dead, view.skipped = (counters[name] for name in COUNTERS)
    view.lost, view.left_to_takeover = (counters[name] for name in UNWRITTEN)
    recent_dead: list[tuple[bytes | str, dict[Any, Any]]] = []
    for index, partition in enumerate(keys.partitions):
        output_length, dead_length, dead_entries = per_partition[3 * index : 3 * index + 3]
        for stream, length in ((partition.output, output_length), (partition.dead, dead_length)):
            if _reply(length, None) is not None:
                view.streams[stream] = int(length)
        recent_dead += _reply(dead_entries, [])
    # Newest first across partitions: entry ids start with their time in ms.
    recent_dead.sort(key=lambda entry: _stream_id(entry[0]), reverse=True)
    for entry_id, fields in recent_dead[:RECENT]:
        values = {_text(name): value for name, value in fields.items()}
        view.dead_letters.append(
            {
                "at_ms": _int(_text(entry_id).partition("-")[0]),
                "id": _text(entry_id),
                # Entries written before dead letters carried these have none.
                "message_id": _text(values.get("message_id")),
                "reason_code": _text(values.get("reason_code")),
                "reason": _text(values.get("reason")),
                "consumer_id": _text(values.get("consumer_id")),
            }
        )
    for _, fields in gaps:
        values = {_text(name): _text(value) for name, value in fields.items()}
        start, end = _int(values.get("start_ms")), _int(values.get("end_ms"))
        view.gaps.append(
            {"at_ms": start, "length_s": (end - start) / 1000, "consumer_id": values["consumer_id"]}
        )
    no_hosts: dict[str, HostInfo] = {}
    view.control, hosts = _unless_wrong_type(
        lambda: read_control(client, keys), (Control(), no_hosts)
    )
    view.hosts = [hosts[host] for host in sorted(hosts)]
    return view


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _role(consumer: ConsumerView) -> str:
    if consumer.role != "reader":
        return consumer.role
    return f"reader>{consumer.feeds}" if consumer.feeds else "reader"


def _state(consumer: ConsumerView) -> str:
    """A reader is subscribed; a fed consumer is fed (by a reader of its host)."""
    if consumer.role == "fed":
        if not consumer.subscribed:
            return "NOT FED"
        return "fed, standing by" if consumer.standby else "fed"
    state = "subscribed" if consumer.subscribed else "NOT SUBSCRIBED"
    if consumer.backlog_bytes:
        state += f", {consumer.backlog_bytes / 1024:,.0f} KiB unread"
    return state


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _control_lines(view: GroupView) -> list[str]:
    """The control plane: desired size, its shortfall, stop, autoscale, each host's share."""
    control = view.control
    desired = (
        f"desired {control.desired} (set by {control.desired_by})"
        if control.desired is not None
        else "no desired size: each host runs its CONSUMERS_COUNT"
    )
    shortfall = max((host.shortfall for host in view.hosts), default=0)
    if shortfall:
        desired += f"; {shortfall} short: the live hosts' MAX_CONSUMERS allow no more"
    lines = ["", f"control: {desired}"]
    if control.stop:
        lines.append(f"GROUP STOP requested by {control.stop}")
    if control.autoscale:
        lines.append(f"last autoscale decision: {control.autoscale}")
    if not view.hosts:
        lines.append("hosts: none registered")
        return lines
    rows = [("HOST", "PID", "RUNNING", "SHARE", "MAX")]
    for host in view.hosts:
        share = "-" if host.share is None else str(host.share)
        running, limit = str(host.running), str(host.max_consumers)
        rows.append((host.host_id, str(host.pid), running, share, limit))
    return lines + _table(rows)


def render(view: GroupView) -> str:
    """The view for a person at a terminal."""
    lines = [
        f"processor status  {view.url}  {time.strftime('%Y-%m-%d %H:%M:%S')}",
        *(f"WRONG TYPE: {problem}" for problem in view.wrong_types),
        f"group: {len(view.consumers)} live consumers | written {view.written:,} | "
        f"dead-lettered {view.dead:,} | skipped as already written {view.skipped:,}",
        f"held unwritten by consumers that exited: lost {view.lost:,} | "
        f"left to a takeover {view.left_to_takeover:,}",
        "streams: " + " | ".join(f"{name} {length:,}" for name, length in view.streams.items()),
        *_control_lines(view),
        "",
    ]
    if view.consumers:
        header = (
            "CONSUMER",
            "HOST",
            "PID",
            "AGE",
            "STRATEGY",
            "ROLE",
            "RATE",
            "HELD",
            "BUFFERED",
            "LAST BEAT",
            "STATE",
        )
        rows = [header]
        for consumer in sorted(view.consumers, key=lambda c: c.consumer_id):
            # Stamped by the consumer's clock, read against Redis's: a few ms ahead reads as 0.
            beat_age = max(0, view.now_ms - consumer.beat_ms) / 1000 if consumer.beat_ms else None
            rows.append(
                (
                    consumer.consumer_id,
                    consumer.host,
                    str(consumer.pid or "?"),
                    _age((view.now_ms - consumer.registered_ms) / 1000),
                    consumer.strategy,
                    _role(consumer),
                    f"{consumer.rate:,.0f}/s",
                    f"{consumer.held:,}",
                    f"{consumer.buffered:,}",
                    "?" if beat_age is None else f"{beat_age:.1f} s ago",
                    _state(consumer),
                )
            )
        lines += _table(rows)
    else:
        lines.append("NO LIVE CONSUMER")
    lines.append("")
    lines.append("last dead letters:" if view.dead_letters else "last dead letters: none")
    for letter in view.dead_letters:
        about = f"  {letter['message_id']}" if letter["message_id"] else ""
        lines.append(
            f"  {_clock(letter['at_ms'])}  {letter['id']}{about}  {letter['reason']}  "
            f"({letter['consumer_id']})"
        )
    if view.dead_letters:
        lines.append("  ('processor dead-letters' lists more; 'processor replay' sends them again)")
    lines.append("recent subscription gaps:" if view.gaps else "recent subscription gaps: none")
    for gap in view.gaps:
        lines.append(f"  {_clock(gap['at_ms'])}  {gap['length_s']:.3f} s  {gap['consumer_id']}")
    return "\n".join(lines)


def main(argv: Sequence[str], prog: str) -> int:
    settings = load_status_settings(argv, prog=prog)
    try:
        with command_session(settings, "processor-status", 2.0) as client:
            view = read_group(client, settings)
    except CONNECTION_ERRORS as error:
        print(
            f"{prog}: error: cannot read the group from {settings.safe_url}: "
            f"{explain(error, settings.url)}",
            file=sys.stderr,
        )
        return ExitCode.UNREACHABLE
    if settings.json:
        print(json.dumps(asdict(view), indent=2))
    else:
        print(render(view))
    if view.wrong_types:
        return ExitCode.CONFIG
    return ExitCode.OK if view.consumers else ExitCode.NO_CONSUMER
