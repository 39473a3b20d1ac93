"""Autoscale: the group's size from its load, one decision per interval for the whole group.

Every consumer reports with its heartbeat (its status hash) how busy it was (the share of the
last 5 s its main loop spent validating, processing and writing), how many messages
it holds unprocessed (``inbox``) and how many bytes Redis holds unread for its subscription
(``backlog_bytes``). The host that wins a short lock in Redis (``SET NX PX`` for one interval)
reads them and decides:

- **grow** when the group falls behind: a consumer's inbox holds more than ``BEHIND_INBOX``
  messages, or Redis holds more than ``BEHIND_BYTES`` for one, or the group is more than
  ``GROW_BUSY`` busy on average. The new size is what would bring the group to ``TARGET_BUSY``
  (at least one more consumer). Not while a consumer stands by: its reader then finds the
  handler cheap enough to handle its messages itself (:mod:`processor.consumer.spread`), and a
  consumer more would stand by too;
- **shrink** by one when nothing is behind and one consumer fewer would be at most
  ``SHRINK_BUSY`` busy on average;
- otherwise hold. After any change nothing moves for the cool-down, which gives new consumers
  time to join and a smaller group time to show its load: the gap between ``GROW_BUSY`` and
  ``SHRINK_BUSY`` and the cool-down keep it from flapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from processor.bounds import Bounds
from processor.store.keys import Keys

BEHIND_INBOX = 1000  # messages a consumer holds unprocessed
BEHIND_BYTES = 1024 * 1024  # bytes Redis holds unread for one subscriber
GROW_BUSY = 0.85
TARGET_BUSY = 0.7
SHRINK_BUSY = 0.5


@dataclass(frozen=True)
class Load:
    """The group's load, from its consumers' status hashes."""

    consumers: int
    busy: float  # sum over the consumers: 1.0 = one consumer fully busy
    max_inbox: int
    max_backlog_bytes: int
    # Fed consumers whose readers handle their messages themselves (consumer/spread.py).
    standing_by: int = 0

    def __str__(self) -> str:
        return (
            f"consumers={self.consumers} busy={self.busy:.2f} "
            f"max_inbox={self.max_inbox} max_backlog_bytes={self.max_backlog_bytes} "
            f"standing_by={self.standing_by}"
        )


@dataclass(frozen=True)
class Decision:
    size: int
    reason: str


def decide(current: int, load: Load, bounds: Bounds, cooling: bool) -> Decision:
    """The group's next size; ``cooling`` while the last change is within the cool-down."""
    if current < bounds.low or current > bounds.high:
        size = min(max(current, bounds.low), bounds.high)
        return Decision(size, f"outside {bounds}")
    if cooling:
        return Decision(current, "cooling down after the last change")
    mean_busy = load.busy / max(load.consumers, 1)
    behind = []
    if load.max_inbox > BEHIND_INBOX:
        behind.append(f"an inbox holds {load.max_inbox} messages")
    if load.max_backlog_bytes > BEHIND_BYTES:
        behind.append(f"Redis holds {load.max_backlog_bytes} bytes for a subscriber")
    if mean_busy > GROW_BUSY:
        behind.append(f"busy {mean_busy:.0%} on average")
    if behind and load.standing_by:
        # A reader finds the handler cheap enough to handle its fed consumers' messages
        # itself: a consumer more would stand by too.
        reason = f"behind ({'; '.join(behind)}) but {load.standing_by} consumers stand by"
        return Decision(current, reason)
    if behind:
        needed = max(current + 1, math.ceil(load.busy / TARGET_BUSY))
        size = min(needed, bounds.high)
        if size == current:
            return Decision(current, f"behind ({'; '.join(behind)}) but at the maximum")
        return Decision(size, "behind: " + "; ".join(behind))
    if current > bounds.low and load.busy <= SHRINK_BUSY * (current - 1):
        return Decision(
            current - 1, f"idle enough: busy {load.busy:.2f} consumers' worth for {current}"
        )
    return Decision(current, f"steady: busy {mean_busy:.0%} on average")


def group_load(client: redis.Redis, keys: Keys) -> Load:
    """Reads every listed consumer's busy, inbox and backlog from its status hash."""
    ids = [member.decode() for member in client.lrange(keys.consumers, 0, -1)]  # type: ignore[union-attr]
    pipe = client.pipeline(transaction=False)
    for consumer_id in ids:
        pipe.hmget(keys.info(consumer_id), "busy", "inbox", "backlog_bytes", "standby")
    reports = [values for values in pipe.execute() if values[0] is not None]
    return Load(
        consumers=len(reports),
        busy=sum(float(busy) for busy, _, _, _ in reports),
        max_inbox=max((int(inbox or 0) for _, inbox, _, _ in reports), default=0),
        max_backlog_bytes=max((int(backlog or 0) for _, _, backlog, _ in reports), default=0),
        standing_by=sum(standby == b"1" for _, _, _, standby in reports),
    )


def take_turn(client: redis.Redis, keys: Keys, host_id: str, interval_ms: int) -> bool:
    """True for the one host that decides for the group in this interval."""
    return bool(client.set(keys.autoscale_lock, host_id, nx=True, px=interval_ms))
