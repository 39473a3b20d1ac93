"""The parent process: keeps this host's share of consumers alive and reports throughput.

The share is ``CONSUMERS_COUNT`` (changed by SIGTTIN/SIGTTOU) until the group has a desired
size in Redis; then it is what :mod:`processor.group.steering` computes from the control plane.

Consumers are spawned (not forked), so no Redis connection or thread crosses the process
boundary; they get the picklable settings and build their own clients. A consumer that dies is
replaced under a new id after a back-off that grows while it keeps crashing. The first SIGINT or
SIGTERM stops the group gracefully; a second one kills the consumers at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from processor.config import MAX_CONSUMERS_PER_HOST, Settings
from processor.consumer.dedup import warn_if_evicting
from processor.consumer.membership import evict_process, leave_script
from processor.consumer.stats import ConsumerStats
from processor.errors import ConfigError, ExitCode, GroupStopped, RetryStopped
from processor.group.controlplane import claim_partitions
from processor.group.signals import CONTROL_SIGNALS, REQUESTS, plan_reload
from processor.group.slot import BLOCKED, SIGNALS, Slot, consumer_process
from processor.group.steering import Order, Steering
from processor.observe.counters import record_unwritten
from processor.observe.health import HealthServer
from processor.observe.metrics import prepare_multiprocess_dir, remove_multiprocess_dir
from processor.observe.monitor import Monitor
from processor.store.access import check_access, retry_at_start, startup_deadline
from processor.store.connection import REDIS_ERRORS, command_client
from processor.store.keys import Keys
from processor.store.keytypes import check_key_types
from processor.store.outage import Backoff, Outage, Retrier

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
        self._metrics_dir = ""
        self._live: Any = None
        self._target: Any = None
        self._restarts: Any = None
        self._slots: list[Slot] = []
        self._local_count = settings.consumers_count
        self._order = Order(None)

    def _connect(self, deadline: float | None) -> bool:
        """Made once Redis answers (a cluster client reads the layout as it is made, so a
        cluster that went away since the start-up check is waited for); False if stopped.
        Raises StartupTimeout past ``deadline``."""
        if self.stop.is_set():
            return False
        outage = Outage("Redis (supervisor)", url=self.settings.url)
        backoff = Backoff(0.1, self.settings.reconnect_backoff_max_s)
        retrier = Retrier(outage, backoff, self.stop, errors=REDIS_ERRORS)
        try:
            # Short timeouts: an eviction must never hold up the replacement of a consumer.
            self._client = retry_at_start(
                self.settings,
                retrier,
                lambda: command_client(self.settings, name="processor-supervisor", timeout_s=1.0),
                deadline,
            )
        except RetryStopped:
            return False
        self._leave = leave_script(self._client)
        self._steering = Steering(self.settings, self._client, self._keys)
        return True

    def _new_slot(self, index: int) -> Slot:
        backoff = Backoff(0.5, self.settings.restart_backoff_max_s)
        return Slot(index, ConsumerStats(self._context), backoff)

    def run(self) -> int:
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)
        for signum in CONTROL_SIGNALS:
            signal.signal(signum, self._on_control)
        # The entry point held them until now: one that came meanwhile is handled here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
        log.info("daemon starting: pid=%d %s", os.getpid(), self.settings.describe())
        deadline = startup_deadline(self.settings)
        # Both raise (ConfigError, StartupTimeout): the entry point reports it.
        check_access(self.settings, self.stop, deadline)
        if self.stop.is_set() or not self._connect(deadline):
            log.info("daemon stopped before Redis was reachable")
            return ExitCode.OK
        try:
            check_key_types(self._client, self._keys)  # raises ConfigError, as check_access
        except REDIS_ERRORS as error:
            log.warning("could not check the types of the daemon's keys: %s", error)
        if self._keys.cluster:
            try:
                # Raises ConfigError (exit 2) when the live group runs with another PARTITIONS.
                claim_partitions(self._client, self._keys, self.settings.partitions)
            except REDIS_ERRORS as error:
                log.warning("could not check PARTITIONS against the group's: %s", error)
        try:
            warn_if_evicting(self._client, self._keys.cluster)
        except REDIS_ERRORS as error:
            log.warning("could not check Redis's maxmemory-policy: %s", error)
        try:
            self._order = self._steering.start(0, self.stop)
        except GroupStopped as stopped:
            log.warning(
                "not starting: the group is asked to stop (%s); 'processor start' or "
                "'processor scale N' clears it",
                stopped,
            )
            self._client.close()
            return ExitCode.OK
        except REDIS_ERRORS as error:
            # The beats retry (and claim the host id) once Redis answers again.
            log.warning("control plane not reached at start (%s): starting CONSUMERS_COUNT", error)
        if self.stop.is_set():
            log.info("daemon stopped before its first consumer started")
            self._steering.leave()
            return ExitCode.OK
        try:
            health = self._start_health()
        except ConfigError:
            self._steering.leave()
            raise
        try:
            return self._supervise()
        finally:
            if health is not None:
                health.close()
            if self._metrics_dir:
                remove_multiprocess_dir(self._metrics_dir)

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
            if self._live is not None:
                self._live.set(sum(self._is_ready(slot) for slot in self._slots))
                self._target.set(self._target_count())
            if time.monotonic() >= next_report:
                next_report += self.settings.monitor_interval_s
                monitor.report()
        code = self._shut_down()
        monitor.report(final=True)
        monitor.close()
        self._client.close()
        _stop_resource_tracker()
        return code

    # -- metrics and probes -------------------------------------------------------------------

    def _start_health(self) -> HealthServer | None:
        """The metrics endpoint, when METRICS_PORT is set; before any consumer starts."""
        settings = self.settings
        if not settings.metrics_port:
            return None
        self._metrics_dir = prepare_multiprocess_dir()
        from prometheus_client import Counter, Gauge

        self._live = Gauge(
            "processor_consumers_live",
            "Local consumers subscribed and registered",
            multiprocess_mode="livemax",
        )
        self._target = Gauge(
            "processor_consumers_target",
            "Consumers this host should run: its share of the group's desired size, or "
            "CONSUMERS_COUNT without one",
            multiprocess_mode="livemax",
        )
        self._restarts = Counter("processor_consumer_restarts", "Local consumers replaced")
        try:
            health = HealthServer(
                settings.metrics_addr, settings.metrics_port, self._alive, self._ready
            )
        except OSError as error:
            raise ConfigError(
                f"invalid METRICS_PORT/METRICS_ADDR: cannot serve on "
                f"{settings.metrics_addr}:{settings.metrics_port}: {error.strerror}"
            ) from None
        health.start()
        log.info(
            "metrics on http://%s:%d/metrics, probes /healthz /readyz",
            settings.metrics_addr,
            health.port,
        )
        return health

    def _is_ready(self, slot: Slot) -> bool:
        process = slot.process
        return process is not None and process.is_alive() and slot.stats.get("ready") == 1

    def _alive(self) -> tuple[bool, str]:
        stalled_s = time.monotonic() - self._loop_tick
        if self.stop.is_set():
            return False, "stopping"
        if stalled_s > 5.0:
            return False, f"supervisor loop stalled for {stalled_s:.1f} s"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        waiting = [slot.index for slot in self._slots if not self._is_ready(slot)]
        if self.stop.is_set():
            return False, "stopping"
        if waiting:
            return False, "not subscribed and registered: slots " + ", ".join(map(str, waiting))
        return True, f"ok: {len(self._slots)} consumers subscribed and registered"

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
                    _kill(slot.process.pid, signal.SIGKILL)
            os._exit(ExitCode.FORCED)

    # -- live control ---------------------------------------------------------------------------

    def _on_control(self, signum: int, frame: FrameType | None) -> None:
        self._requests.append(REQUESTS[signal.Signals(signum)])

    def _handle(self, request: str) -> None:
        if request == "reload":
            self._reload_settings()
            return
        signame = "SIGTTIN" if request == "add" else "SIGTTOU"
        if self._order.size is not None:
            log.warning(
                "%s ignored: the group's size is set in Redis (processor scale); "
                "use 'processor scale N'",
                signame,
            )
            return
        if request == "remove" and self._local_count <= 1:
            log.warning("SIGTTOU ignored: the last consumer stays (stop the daemon instead)")
            return
        if request == "add" and self._local_count >= MAX_CONSUMERS_PER_HOST:
            log.warning(
                "SIGTTIN ignored: %d consumers is the most one daemon runs (run more hosts)",
                self._local_count,
            )
            return
        before = self._local_count
        self._local_count += 1 if request == "add" else -1
        log.info("%s: consumers %d -> %d", signame, before, self._local_count)

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
            _kill(slot.process.pid, signal.SIGTERM)

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
        if not all(self._is_ready(slot) for slot in self._slots if not slot.retiring):
            return  # one at a time: never two of the group away at once
        slot = self._recycle.popleft()
        if slot in self._slots and slot.process is not None and slot.process.pid:
            slot.recycling = True
            _kill(slot.process.pid, signal.SIGTERM)

    def _start(self, slot: Slot) -> None:
        # Until the new consumer registers under its own id and says it is ready.
        slot.stats.consumer_id = ""
        slot.stats.set(ready=0)
        process = self._context.Process(
            target=consumer_process,
            args=(self.settings, slot.index, slot.stats),
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
                if self._restarts is not None:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                if slot.retiring or slot.recycling:
                    self._stopped_on_request(slot, process)
                    continue
                if self._restarts is not None:
                    self._restarts.inc()
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
        """Takes a dead consumer out of the group now, so the others take over its share.

        Its heartbeat would expire on its own, but until then what it had not written lives
        only in the takeover buffers of the others, which may die too in the meantime.
        """
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
        self._steering.leave()  # the other hosts take our share while ours drain
        running = [slot for slot in self._slots if slot.process is not None]
        for slot in running:
            if slot.process is not None and slot.process.pid:
                _kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        for slot in running:
            if slot.process is not None:
                slot.process.join(max(0.0, deadline - time.monotonic()))
        code = ExitCode.OK
        killed_holding = 0
        for slot in running:
            process = slot.process
            if process is None:
                continue
            if process.is_alive() and not slot.stats.consumer_id:
                # Still starting (importing, subscribing; a spawn of many on a loaded host can
                # outlast the grace): never registered, so it owned nothing and holds nothing.
                log.info(
                    "consumer pid %s was still starting after SHUTDOWN_GRACE: stopping it "
                    "(never registered, it holds nothing)",
                    process.pid,
                )
                if process.pid:
                    _kill(process.pid, signal.SIGKILL)
                process.join(5)
                self._evict(slot.index, process)
            elif process.is_alive():
                held = slot.stats.get("held")
                killed_holding += held
                log.error(
                    "consumer pid %s did not stop in time: killing it; it held %d unwritten "
                    "messages at its last step (lost)",
                    process.pid,
                    held,
                )
                if process.pid:
                    _kill(process.pid, signal.SIGKILL)
                process.join(5)
                code = ExitCode.CONSUMER_ERROR
            elif process.exitcode != 0:
                log.error("consumer pid %s exited with code %s", process.pid, process.exitcode)
                code = ExitCode.CONSUMER_ERROR
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


def _stop_resource_tracker() -> None:
    """Reaps the resource tracker that starting spawned processes forked: otherwise it
    outlives us for a moment, orphaned to init (a leftover in our process group)."""
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        stop()


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """Runs the daemon until stopped; ``reload`` re-reads the settings on SIGHUP."""
    code = Supervisor(settings, reload).run()
    sys.stdout.flush()
    return code
