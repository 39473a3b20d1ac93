"""Spreading: whether the group's fed consumers own lanes now, or the readers own them all.

A fed consumer's message costs a hop a reader's own does not: its reader sends it, it receives
it, in one more process. With a cheap handler that hop is most of what a message costs, and
on a host whose cores the readers already keep busy, more processes only make the group slower
(10 consumers drained 0.9x the rate of 2 on 2 cores, for 1.4x the CPU a message). More
consumers help when the handler is what holds the readers up: a slow computation, a call to
another service. So with ``SPREAD=auto`` the readers own every lane while the handler costs
them little, and the fed consumers stand by (live, listed, fed, owning nothing); they own
their share once a working member finds that the readers alone would spend ``SPREAD_AT`` of
their time in the handler, and until that falls under ``KEEP_AT``. ``SPREAD=always``: the fed
consumers always own their share.

Every member must assign the lanes among the same members, so the decision is the group's: a
key (``Keys.spread``) that exists while the group spreads. A working member whose load calls
for spreading sets it, with a TTL of ``SPREAD_HOLD_MS``, at each beat; nobody deletes it, it
lapses. A member tells the fed consumers by their heartbeat token (``FED_TOKEN``).

To the ownership a change of the working members is a change of the group: fed consumers that
start owning lanes are newcomers (their readers route to them at once, the others keep routing
as before for the hand-over grace), and fed consumers that stop are departures (the readers
try what they routed to them; the write skips what was written).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from processor.consumer.membership import View
from processor.consumer.stats import BusyMeter
from processor.observe.logs import Tagged
from processor.store.keys import Keys

log = logging.getLogger(__name__)

# The share of their time the readers alone would spend in the handler, above which the group
# spreads: the hop then costs little beside the handler, and fed consumers take work off them.
SPREAD_AT = 0.5
# ... and under which it stops (after the hold): apart from SPREAD_AT, so it does not flap.
KEEP_AT = 0.25


# The handler's share of a consumer's time is measured over this long: a burst for a slow
# handler must spread within a second or two, and the hold bridges a lull this short.
LOAD_WINDOW_S = 1.0
# A handler cheaper than this a message (ten times what the hop costs a fed consumer's message)
# never spreads on a backlog alone: most of the time a backlog of such messages takes is spent
# outside the handler, where more processes only add to it.
BACKLOG_MIN_PER_MESSAGE_S = 50e-6


class HandlerLoad:
    """How much of one consumer's time the handler takes: its share over the last
    ``LOAD_WINDOW_S``, or more when what the consumer holds unprocessed would keep a handler of
    ``BACKLOG_MIN_PER_MESSAGE_S`` or more busy longer than that (a burst: the share only shows
    it once it is being worked off). The consumer's loop adds; the heartbeat reads."""

    def __init__(self) -> None:
        self._busy = BusyMeter(LOAD_WINDOW_S)
        self._per_message_s = 0.0  # the last batch's

    def add(self, seconds: float, messages: int) -> None:
        self._busy.add(seconds)
        self._per_message_s = seconds / max(messages, 1)

    def load(self, unprocessed: int) -> float:
        share = self._busy.share()
        if self._per_message_s < BACKLOG_MIN_PER_MESSAGE_S:
            return share
        return max(share, unprocessed * self._per_message_s / LOAD_WINDOW_S)


def readers_load(handler_load: float, working: int, readers: int) -> float:
    """The share of their time the readers alone would spend in the handler, from ours: the
    lanes, and so the handler's time, are shared evenly among the ``working`` members."""
    return handler_load * working / max(readers, 1)


def calls_for_spreading(load: float, spreading: bool) -> bool:
    return load >= (KEEP_AT if spreading else SPREAD_AT)


def working_members(view: View, spreading: bool) -> frozenset[str]:
    """The members that own lanes: all of them while the group spreads, else the readers."""
    members = frozenset(view.members)
    return members if spreading else members - view.fed


class Spread:
    """One member's side of spreading: at each beat, the working members of its view."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        mode: str,
        hold_ms: int,
        handler_load: Callable[[], float],
        tagged: Tagged,
    ) -> None:
        self._client = client
        self._key = keys.spread
        self._mode = mode
        self._hold_ms = hold_ms
        self._handler_load = handler_load
        self._log = tagged.on(log)
        self.spreading = False

    def working(self, view: View, me: str) -> frozenset[str]:
        """Who owns lanes by ``view``; sets the group's key when our load calls for spreading.
        One command a beat, and none in a group without fed consumers."""
        if not view.fed:
            self.spreading = False
            return frozenset(view.members)
        working = working_members(view, self.spreading)
        readers = len(view.members) - len(view.fed)
        load = readers_load(self._handler_load(), len(working), readers)
        ours = self._mode == "always" or (
            me in working and calls_for_spreading(load, self.spreading)
        )
        if ours:
            # Set by every member of SPREAD=always too: a group whose hosts differ in this
            # setting must still assign lanes among the same members.
            self._client.set(self._key, me, px=self._hold_ms)
            spreading = True
        else:
            spreading = bool(self._client.exists(self._key))
        if spreading and not self.spreading:
            self._log.info(
                "the group spreads: fed consumers take their share of the lanes%s",
                f" (the readers alone would spend {load:.0%} of their time in the handler)"
                if ours and self._mode == "auto"
                else "",
            )
        elif self.spreading and not spreading:
            self._log.info("the group stopped spreading: the readers take back every lane")
        self.spreading = spreading
        return working_members(view, spreading)
