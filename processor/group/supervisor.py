"""The parent process: keeps this host's share of consumers alive and reports throughput.

The share is ``CONSUMERS_COUNT`` (changed by SIGTTIN/SIGTTOU) until the group has a desired
size in Redis; then it is what :mod:`processor.group.steering` computes from the control plane.

Consumers are spawned (not forked), so no Redis connection or thread crosses the process
boundary; they get the picklable settings and build their own clients. A consumer that dies is
replaced under a new id after a back-off that grows while it keeps crashing. The first SIGINT or
SIGTERM stops the group gracefully; a second one kills the consumers at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType

from processor.config import Settings
from processor.consumer.feeds import FeedPlan
from processor.consumer.membership import evict_process, leave_script
from processor.consumer.stats import ConsumerStats
from processor.errors import ConfigError, ExitCode, GroupStopped
from processor.group.probes import Probes, readiness
from processor.group.shutdown import kill, stop_consumers, stop_resource_tracker
from processor.group.signals import CONTROL_SIGNALS, REQUESTS, plan_reload, resized_count
from processor.group.slot import BLOCKED, SIGNALS, Slot, consumer_process, reader_to_restore
from processor.group.startup import connect_and_check
from processor.group.steering import Order, Steering
from processor.group.systemd import Notifier
from processor.observe.counters import record_unwritten
from processor.observe.monitor import Monitor
from processor.store.connection import REDIS_ERRORS
from processor.store.keys import Keys
from processor.store.outage import Backoff

log = logging.getLogger(__name__)

# A consumer that ran this long before dying was healthy: its replacement starts at once.
HEALTHY_RUN_S = 10.0


class Supervisor:
    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reload = reload
        self._requests: deque[str] = deque()
        self._recycle: deque[Slot] = deque()
        self.stop = threading.Event()
        self._signals = 0
        self._context = multiprocessing.get_context("spawn")
        self._keys = Keys.from_settings(settings)
        self._loop_tick = time.monotonic()
        self._probes: Probes | None = None
        self._slots: list[Slot] = []
        self._local_count = settings.consumers_count
        self._order = Order(None)
        self._systemd = Notifier(settings.notify_socket)
        # Names our readers' feed sockets: unique to this daemon, so two on one host never meet.
        self._feed_prefix = f"processor-{os.getpid()}-{secrets.token_hex(4)}"

    def _new_slot(self, index: int) -> Slot:
        stats, stale_s = ConsumerStats(self._context), self.settings.heartbeat_ttl_ms / 1000
        return Slot(index, stats, Backoff(0.5, self.settings.restart_backoff_max_s), stale_s)

    def run(self) -> int:
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)
        for signum in CONTROL_SIGNALS:
            signal.signal(signum, self._on_control)
        # The entry point held them until now: one that came meanwhile is handled here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
        log.info("daemon starting: pid=%d %s", os.getpid(), self.settings.describe())
        # Raises ConfigError or StartupTimeout: the entry point reports it.
        client = connect_and_check(self.settings, self._keys, self.stop)
        if client is None or self.stop.is_set():
            log.info("daemon stopped before Redis was reachable")
            return ExitCode.OK
        self._client = client
        self._leave = leave_script(client)
        self._steering = Steering(self.settings, client, self._keys)
        try:
            self._order = self._steering.start(0, self.stop)
        except GroupStopped as stopped:
            log.warning(
                "not starting: the group is asked to stop (%s); 'processor start' or "
                "'processor scale N' clears it",
                stopped,
            )
            self._systemd.declined(f"not starting: the group is asked to stop ({stopped})")
            self._client.close()
            return ExitCode.OK
        except REDIS_ERRORS as error:
            # The beats retry (and claim the host id) once Redis answers again.
            log.warning("control plane not reached at start (%s): starting CONSUMERS_COUNT", error)
        if self.stop.is_set():
            log.info("daemon stopped before its first consumer started")
            self._steering.leave()
            return ExitCode.OK
        if self.settings.metrics_port:
            try:
                self._probes = Probes(
                    self.settings, lambda: self._slots, self.stop, lambda: self._loop_tick
                )
            except ConfigError:
                self._steering.leave()
                raise
        try:
            return self._supervise()
        finally:
            if self._probes is not None:
                self._probes.close()

    def _supervise(self) -> int:
        monitor = Monitor(self.settings, lambda: [slot.stats for slot in self._slots])
        self._resize()
        next_report = time.monotonic() + self.settings.monitor_interval_s
        while not self.stop.is_set():
            self._loop_tick = time.monotonic()
            self._wait(min(next_report, self._next_restart(), self._steering.next_beat))
            if self.stop.is_set():
                break  # consumers that exit now were stopped by the same signal: no restarts
            self._reap_and_restart()
            while self._requests:
                self._handle(self._requests.popleft())
            self._order = self._steering.tick(len(self._serving()), self._received())
            if self._order.stopping:
                log.info("stopping gracefully: %s", self._order.stop_reason)
                self.stop.set()
                break
            self._resize()
            self._recycle_next()
            if self._probes is not None:
                self._probes.update(self._target_count())
            self._systemd.update(readiness(self._slots, self.stop))
            if time.monotonic() >= next_report:
                next_report += self.settings.monitor_interval_s
                monitor.report()
        code = self._shut_down()
        monitor.report(final=True)
        monitor.close()
        self._client.close()
        stop_resource_tracker()
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s received: stopping consumers gracefully", name)
            self.stop.set()
        else:
            log.warning(
                "%s received again: killing consumers now; they held %d unwritten messages at "
                "their last step (lost)",
                name,
                sum(slot.stats.get("held") for slot in self._slots if slot.process is not None),
            )
            for slot in self._slots:
                if slot.process is not None and slot.process.pid:
                    kill(slot.process.pid, signal.SIGKILL)
            os._exit(ExitCode.FORCED)

    # -- live control ---------------------------------------------------------------------------

    def _on_control(self, signum: int, frame: FrameType | None) -> None:
        self._requests.append(REQUESTS[signal.Signals(signum)])

    def _handle(self, request: str) -> None:
        if request == "reload":
            self._reload_settings()
            return
        self._local_count = resized_count(request, self._local_count, self._order.size is not None)

    # -- the number of consumers ----------------------------------------------------------------

    def _serving(self) -> list[Slot]:
        return [slot for slot in self._slots if not slot.retiring]

    def _received(self) -> int:
        return sum(slot.stats.get("received") for slot in self._slots)

    def _target_count(self) -> int:
        return self._local_count if self._order.size is None else self._order.size

    def _resize(self) -> None:
        """Starts or retires consumers to match the order (or the local count without one)."""
        if self.stop.is_set():
            return  # a signal arrived meanwhile: the shutdown stops what runs
        give_way = reader_to_restore(self._slots, self.settings)
        if give_way is not None:
            self._retire(give_way)  # its replacement, started below, takes the reader's index
        target = self._target_count()
        serving = self._serving()
        for _ in range(target - len(serving)):
            if self.stop.is_set():
                return  # each start takes a while: a signal meanwhile must not wait for them all
            taken = {slot.index for slot in self._slots}
            slot = self._new_slot(min(set(range(len(taken) + 1)) - taken))
            self._slots.append(slot)
            self._start(slot)
        if len(serving) > target:
            surplus = sorted(serving, key=lambda s: s.index, reverse=True)[: len(serving) - target]
            for slot in surplus:
                self._retire(slot)

    def _retire(self, slot: Slot) -> None:
        """The consumer drains, writes what it holds and leaves, as on a graceful stop."""
        slot.retiring = True
        if slot.process is None:  # waiting to be restarted: nothing to drain
            self._slots.remove(slot)
            return
        log.info(
            "consumer slot %d (pid %s) drains, writes what it holds and leaves",
            slot.index,
            slot.process.pid,
        )
        if slot.process.pid:
            kill(slot.process.pid, signal.SIGTERM)

    def _reload_settings(self) -> None:
        if self._reload is None:
            log.warning("SIGHUP ignored: this daemon was started without a way to reload")
            return
        try:
            plan = plan_reload(self.settings, self._reload())
        except ConfigError as error:
            log.error("SIGHUP: configuration not reloaded, keeping the current one: %s", error)
            return
        for change in plan.not_applied:
            log.warning("SIGHUP: %s needs a restart of the daemon: not applied", change)
        if not plan.applied:
            log.info("SIGHUP: nothing to apply")
            return
        self.settings = plan.settings
        logging.getLogger().setLevel(self.settings.loglevel)
        log.info("SIGHUP: applied %s", "; ".join(plan.applied))
        if plan.replace_consumers:
            log.info("SIGHUP: replacing the consumers one at a time, each draining first")
            self._recycle.extend(slot for slot in self._slots if not slot.retiring)

    def _recycle_next(self) -> None:
        """Stops the next consumer to replace once the previous replacement is ready."""
        if any(slot.recycling for slot in self._slots) or not self._recycle:
            return
        if not all(slot.is_ready() for slot in self._slots if not slot.retiring):
            return  # one at a time: never two of the group away at once
        slot = self._recycle.popleft()
        if slot in self._slots and slot.process is not None and slot.process.pid:
            slot.recycling = True
            kill(slot.process.pid, signal.SIGTERM)

    def _start(self, slot: Slot) -> None:
        # Until the new consumer registers under its own id and says it is ready.
        slot.stats.consumer_id = ""
        slot.stats.starting()
        plan = FeedPlan(self._feed_prefix, self.settings.readers_per_host)
        process = self._context.Process(
            target=consumer_process,
            args=(self.settings, slot.index, slot.stats, plan),
            name=f"consumer-{slot.index}",
        )
        # Blocked across the start so a signal cannot reach the child before its handler is in.
        # The first start would also start multiprocessing's resource tracker, which unblocks
        # SIGINT and SIGTERM once it is up: before the consumer forks, which a SIGTERM then
        # kills. So the tracker is made sure of first.
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
        slot.process = process
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.info("consumer slot %d started: pid=%s", slot.index, process.pid)

    def _next_restart(self) -> float:
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        return min(due, default=float("inf"))

    def _wait(self, until: float) -> None:
        sentinels = [slot.process.sentinel for slot in self._slots if slot.process is not None]
        timeout = max(0.0, min(until - time.monotonic(), 0.5))
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout)
        else:
            self.stop.wait(timeout)

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for slot in list(self._slots):
            process = slot.process
            if process is not None and not process.is_alive():
                process.join()
                self._evict(slot.index, process)
                replaced = not (slot.retiring or slot.recycling)
                if self._probes is not None:
                    self._probes.exited(process.pid, replaced)
                if not replaced:
                    self._stopped_on_request(slot, process)
                    continue
                lived = now - slot.started_at
                if lived >= HEALTHY_RUN_S:
                    slot.backoff.reset()
                delay = 0.0 if lived >= HEALTHY_RUN_S else slot.backoff.next_delay()
                log.warning(
                    "consumer slot %d (pid %s, %s) exited with code %s after %.1f s; "
                    "replacing it in %.2f s",
                    slot.index,
                    process.pid,
                    slot.stats.consumer_id,
                    process.exitcode,
                    lived,
                    delay,
                )
                slot.process = None
                slot.restarts += 1
                slot.restart_at = now + delay
            due = slot.restart_at is not None and now >= slot.restart_at
            if slot.process is None and due and not self.stop.is_set():
                self._start(slot)

    def _stopped_on_request(self, slot: Slot, process: BaseProcess) -> None:
        log.info(
            "consumer slot %d (pid %s, %s) stopped with code %s%s",
            slot.index,
            process.pid,
            slot.stats.consumer_id,
            process.exitcode,
            " and leaves the group" if slot.retiring else "; starting its replacement",
        )
        if slot.retiring:
            self._slots.remove(slot)
            return
        slot.recycling = False
        slot.process = None
        if not self.stop.is_set():
            self._start(slot)

    def _evict(self, index: int, process: BaseProcess) -> None:
        """Takes a dead consumer out of the group now, so the others take over its share: until
        its heartbeat expired, what it had not written would live only in the others' takeover
        buffers, and they may die too."""
        if process.pid is None:
            return
        reason = f"exited with code {process.exitcode}"
        try:
            removed = evict_process(self._leave, self._keys, process.pid, index, reason)
        except REDIS_ERRORS as error:
            # Never fatal to the supervisor (a refused command, a script from another version):
            # the heartbeat's expiry still takes the consumer out of the group.
            log.warning(
                "consumer slot %d (pid %s) exited and could not be removed from the group (%s): "
                "the group will notice when its heartbeat expires",
                index,
                process.pid,
                error,
            )
            return
        if removed:
            log.info("consumer slot %d: %s removed from the group", index, ", ".join(removed))

    def _shut_down(self) -> int:
        """Forwards the stop to every consumer, waits for their flush, kills stragglers."""
        self._systemd.stopping()
        self._steering.leave()  # the other hosts take our share while ours drain
        code, killed_holding = stop_consumers(
            self._slots,
            self.settings.shutdown_grace_s,
            lambda slot: self._evict(slot.index, slot.process) if slot.process else None,
        )
        if killed_holding:
            try:
                record_unwritten(self._client, self._keys, lost=killed_holding, left_to_takeover=0)
            except REDIS_ERRORS as error:
                log.warning("lost=%d not added to the group's counters: %s", killed_holding, error)
        log.info(
            "daemon stopped: consumers=%d restarts=%d",
            len(self._slots),
            sum(slot.restarts for slot in self._slots),
        )
        return code


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """Runs the daemon until stopped; ``reload`` re-reads the settings on SIGHUP."""
    code = Supervisor(settings, reload).run()
    sys.stdout.flush()
    return code
