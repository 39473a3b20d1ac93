"""One place in the group, and the entry point of the consumer process that fills it."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

from processor.config import Settings
from processor.consumer.feeds import FeedPlan
from processor.consumer.stats import ConsumerStats
from processor.errors import ConsumerFailed, ExitCode
from processor.group.signals import CONTROL_SIGNALS
from processor.store.outage import Backoff

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Blocked by the supervisor across a start, so a signal cannot reach the child before its
# handlers are in.
BLOCKED = (*SIGNALS, *CONTROL_SIGNALS)


def consumer_process(
    settings: Settings, slot: int, stats: ConsumerStats, plan: FeedPlan | None = None
) -> None:
    """Entry point of a consumer process."""
    from processor.consumer.consumer import Consumer
    from processor.observe.logs import configure_logging
    from processor.observe.titles import consumer_title, set_title

    configure_logging(settings.loglevel, settings.log_format)
    set_title(consumer_title(slot, ""))
    consumer = Consumer(settings, slot, stats, plan=plan)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Every signal means "stop gracefully" here: a Ctrl-C in a terminal or systemd's
        # KillMode=control-group reaches us directly *and* through the supervisor's forward, so
        # counting signals would turn one request into a forced exit. "Now" is the supervisor's
        # call: its second signal SIGKILLs us.
        consumer.stop.set()

    for signum in SIGNALS:
        signal.signal(signum, on_signal)
    # Meant for the supervisor; a process-group-wide one (a terminal's hang-up) must not stop us.
    for signum in CONTROL_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # The supervisor blocked these before starting us; they are safe to receive now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
    try:
        lost = consumer.run()
    except ConsumerFailed:
        sys.exit(ExitCode.CONSUMER_ERROR)  # the failing thread's traceback is logged already
    except Exception:
        # Outside the watched threads (its set-up): logged in LOG_FORMAT, where multiprocessing
        # would print the traceback raw to stderr.
        logging.getLogger(__name__).exception("consumer process failed")
        sys.exit(ExitCode.CONSUMER_ERROR)
    # A signal arriving while the interpreter finalizes would find the default handler again
    # (Python restores it) and kill us with -SIGTERM after a clean stop: ignore them from here.
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if lost:
        # Said in our stop line; the exit code tells the supervisor, and through it an
        # operator's Restart=on-failure, that this stop was not clean.
        sys.exit(ExitCode.CONSUMER_ERROR)


@dataclass
class Slot:
    """One place in the group: its counters survive the consumers that fill it."""

    index: int
    stats: ConsumerStats
    backoff: Backoff
    # HEARTBEAT_TTL_MS: a consumer silent this long is stopped, or its heartbeat thread stuck;
    # its last report is not believed past it (the group declares it dead as late).
    stale_s: float
    process: BaseProcess | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = field(default=0)
    # Stopping on SIGTTOU: removed once it has exited, never restarted.
    retiring: bool = False
    # Stopping to be replaced at once with reloaded settings (SIGHUP).
    recycling: bool = False

    def is_ready(self) -> bool:
        """Its consumer runs, subscribed (or fed) and registered, as of a recent report."""
        return self.reports() and self.stats.get("ready") == 1

    def is_receiving(self) -> bool:
        """Its consumer runs, subscribed (a reader) or fed, as of a recent report."""
        return self.reports() and self.stats.get("receiving") == 1

    def reports(self) -> bool:
        """Its process lives and has reported within ``stale_s``: the one age check of what the
        consumer says of itself, which a stopped one would otherwise keep saying for good."""
        process = self.process
        return process is not None and process.is_alive() and self.stats.age_s() < self.stale_s


def reader_to_restore(slots: list[Slot], settings: Settings) -> Slot | None:
    """The fed slot that gives way when a reader's index is free while it serves (the group
    shrank while that reader drained, then grew before it left), so that its replacement takes
    the reader's index: the host keeps its ``READERS_PER_HOST`` copies for takeovers."""
    if settings.strategy == "race":
        return None  # every consumer reads
    readers = settings.readers_per_host
    taken = {slot.index for slot in slots}
    fed = [slot for slot in slots if not slot.retiring and slot.index >= readers]
    if not fed or taken >= set(range(readers)):
        return None
    return max(fed, key=lambda slot: slot.index)
