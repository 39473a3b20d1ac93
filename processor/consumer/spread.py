"""Spreading: whether a reader sends the consumers it feeds their messages, or handles them itself.

A fed consumer's message costs a hop a reader's own does not: the reader sends it, the fed
consumer receives it, in one more process. With a cheap handler that hop is most of what a
message costs, and on a host whose cores the readers already keep busy, more processes only
make the group slower (10 consumers drained 0.86-0.95x the rate of 2 on 2 cores, for 1.3-1.44x
the daemon's CPU a message). More consumers help when the handler is what holds the readers
up: a slow computation, a call to another service.

So with ``SPREAD=auto`` a reader handles the messages of the consumers it feeds itself while
the handler takes little of its time: they stand by (live, listed, owning their lanes, sent
only ticks, which say so). Once the handler takes ``SPREAD_AT`` of the reader's time, it sends
them their messages, those it holds for them unhandled included; it takes them back once, for
``SPREAD_HOLD_MS``, handling them itself would have taken less than ``KEEP_AT`` of its time.
``SPREAD=always``: it always sends them.

The choice is the reader's alone, and nothing else changes with it: the fed consumers own their
lanes throughout, the readers keep the same copies, and a takeover finds them as before (a
reader that dies holding its fed consumers' messages ends their feeds, so they report a gap
and the other readers try what they routed to them). Readers that choose differently, or
switch at any pace, cannot leave a lane to nobody.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from processor.consumer.ownership import PartitionedStrategy
from processor.consumer.stats import BusyMeter
from processor.observe.logs import Tagged

log = logging.getLogger(__name__)

# The share of a reader's time the handler takes, from which it sends the consumers it feeds
# their messages: the hop then costs little beside the handler, and they take work off it.
SPREAD_AT = 0.5
# ... and under which it takes them back (after the hold): apart, so that it does not flap.
KEEP_AT = 0.25
# The handler's share of a reader's time is measured over this long: a burst for a slow handler
# spreads within a second or two, and the hold bridges a lull this short.
LOAD_WINDOW_S = 1.0
# A handler cheaper than this a message (ten times what the hop costs) never spreads on a
# backlog alone: most of the time a backlog of such messages takes is spent outside the
# handler, where more processes only add to it.
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


def load_if_kept(load: float, spreading: bool, own_lanes: int, family_lanes: int) -> float:
    """The share of our time the handler would take if we handled the messages of the
    consumers we feed too: ``load`` itself when we do, else scaled from our own lanes to
    theirs and ours together (the lanes carry about as many messages each)."""
    return load * family_lanes / max(own_lanes, 1) if spreading else load


class Spread:
    """A reader's choice, made again at each heartbeat."""

    def __init__(
        self,
        strategy: PartitionedStrategy,
        mode: str,
        hold_s: float,
        handler_load: Callable[[], float],
        send_backlog: Callable[[], int],
        tagged: Tagged,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._strategy = strategy
        self._send_backlog = send_backlog
        self._always = mode == "always"
        self._hold_s = hold_s
        self._handler_load = handler_load
        self._log = tagged.on(log)
        self._clock = clock
        # When handling their messages ourselves last called for spreading (or we started).
        self._busy_at = clock()
        strategy.spread(self._always)

    def beat(self) -> None:
        if self._always:
            return
        own, family = self._strategy.lanes()
        spreading = self._strategy.spreading
        load = load_if_kept(self._handler_load(), spreading, own, family)
        now = self._clock()
        if load >= (KEEP_AT if spreading else SPREAD_AT):
            self._busy_at = now
        if not spreading and load >= SPREAD_AT and family > own:
            self._strategy.spread(True)
            # A burst we kept for them is theirs to work off too, not ours alone.
            sent = self._send_backlog()
            self._log.info(
                "sending the consumers we feed their messages: the handler took %.0f%% of our "
                "time (%d held for them and not handled yet sent too)",
                100 * load,
                sent,
            )
        elif spreading and load < KEEP_AT and now - self._busy_at >= self._hold_s:
            self._strategy.spread(False)
            self._log.info(
                "handling the messages of the consumers we feed ourselves: the handler would "
                "take %.0f%% of our time",
                100 * load,
            )
