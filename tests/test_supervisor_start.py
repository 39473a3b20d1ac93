"""Starting the consumers: a bound on how many one daemon runs, and a SIGTERM while they start
stops the start and shuts down what started, exit 0."""

from __future__ import annotations

import logging
import signal

import pytest

from processor.cli import DAEMON_SIGNALS
from processor.config import DAEMON_OPTIONS, MAX_CONSUMERS_PER_HOST, Settings
from processor.group.slot import BLOCKED, Slot
from processor.group.supervisor import Supervisor
from tests.faults_support import Daemon, daemon_env, group_alive, group_members, wait_for_result
from tests.helpers import wait_until

# Generous on a shared machine: a healthy run needs a fraction of each.
EXIT_S = 15.0
START_S = 30.0


def test_a_consumer_count_above_the_bound_exits_2_and_starts_none(procs, redis_url):
    env = daemon_env(redis_url, "partitioned", 100_000, {})
    proc = procs.start(["demo/consume.py"], env=env)
    daemon = Daemon(procs, proc, redis_url, 100_000)
    started: set[int] = set()

    def over() -> bool:
        started.update(daemon.consumers())
        return proc.poll() is not None or bool(started)

    try:
        wait_until(over, EXIT_S, interval=0.01, message=f"still running after {EXIT_S:g} s")
    finally:
        daemon.close()
    assert not started, f"consumers started: {sorted(started)}"
    assert proc.returncode == 2, daemon.log()
    assert daemon.log().strip() == (
        "consume.py: error: invalid CONSUMERS_COUNT (from environment): 100000 is more than "
        f"{MAX_CONSUMERS_PER_HOST}, the most consumer processes one daemon runs (run more hosts "
        "instead)"
    )


def _stopped_within(procs, proc, why: str) -> None:
    """The daemon exits 0 and leaves nothing of its process group behind."""
    log = procs.output(proc)
    assert proc.wait(timeout=EXIT_S) == 0, f"{why}: exit {proc.returncode}\n{log[-3000:]}"
    if not wait_for_result(lambda: not group_alive(proc.pid), timeout=EXIT_S):
        raise AssertionError(f"{why}: still in the group: {group_members(proc.pid)}")


def test_sigterm_half_a_second_after_start_stops_all_of_16_consumers(procs, redis_url):
    proc = procs.start(["demo/consume.py"], env=daemon_env(redis_url, "partitioned", 16, {}))
    # The scenario itself, not a wait for something: an operator's stop right after a start
    # lands anywhere in the start-up (imports, the start-up check, the consumers' start).
    wait_for_result(lambda: proc.poll() is not None, timeout=0.5)
    proc.send_signal(signal.SIGTERM)
    _stopped_within(procs, proc, "SIGTERM 0.5 s after start")


def test_sigterm_as_the_first_consumer_starts_shuts_down_exit_0(procs, redis_url):
    proc = procs.start(["demo/consume.py"], env=daemon_env(redis_url, "partitioned", 16, {}))
    wait_until(
        lambda: "consumer slot 0 started" in procs.output(proc),
        START_S,
        interval=0.01,
        message=f"no consumer started within {START_S:g} s",
    )
    proc.send_signal(signal.SIGTERM)
    _stopped_within(procs, proc, "SIGTERM as the first consumer started")
    assert "killed" not in procs.output(proc) and "exited with code -15" not in procs.output(proc)


def test_sigterm_while_the_daemon_still_loads_is_a_graceful_stop(procs, redis_url, tmp_path):
    """Before the supervisor's handlers are in, SIGTERM would kill the daemon (-15): the entry
    point holds it until then."""
    env = daemon_env(redis_url, "partitioned", 2, {})
    env.update(HANDLER="tests.slow_import_handler:echo", SLOW_IMPORT_DIR=str(tmp_path))
    proc = procs.start(["demo/consume.py"], env=env)
    wait_until(
        lambda: (tmp_path / "importing").exists(),
        START_S,
        message=f"the handler was not being imported within {START_S:g} s",
    )
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "go").touch()
    _stopped_within(procs, proc, "SIGTERM while the handler was imported")
    assert "consumer slot" not in procs.output(proc), "consumers started after the SIGTERM"


# -- the pieces ---------------------------------------------------------------------------------


def _supervisor(count: int) -> Supervisor:
    return Supervisor(Settings(consumers_count=count))


def test_a_stop_while_consumers_start_ends_the_start(monkeypatch):
    supervisor = _supervisor(16)
    started = []

    def start(slot: object) -> None:
        started.append(slot)
        if len(started) == 3:
            supervisor.stop.set()  # as the SIGTERM handler does

    monkeypatch.setattr(supervisor, "_start", start)
    supervisor._resize()
    assert len(started) == 3


def test_a_readers_index_freed_under_a_fed_consumer_is_taken_back(monkeypatch):
    """Two consumers, then one (reader 1 drains), then two again before it left: the new one
    is fed (slot 2). Once reader 1 has left, slot 2 gives way to a new reader in slot 1."""
    supervisor = _supervisor(2)
    started: list[int] = []
    retired: list[int] = []
    monkeypatch.setattr(supervisor, "_start", lambda slot: started.append(slot.index))

    def retire(slot: Slot) -> None:
        slot.retiring = True
        retired.append(slot.index)

    monkeypatch.setattr(supervisor, "_retire", retire)
    supervisor._resize()
    assert started == [0, 1]
    reader = supervisor._slots[1]
    reader.retiring = True  # SIGTTOU: it drains
    supervisor._resize()  # SIGTTIN while it drains
    assert started == [0, 1, 2] and retired == []
    supervisor._slots.remove(reader)  # it has left
    supervisor._resize()
    assert retired == [2] and started == [0, 1, 2, 1]
    assert sorted(slot.index for slot in supervisor._slots if not slot.retiring) == [0, 1]


def test_sigttin_at_the_bound_is_logged_and_ignored(caplog):
    supervisor = _supervisor(MAX_CONSUMERS_PER_HOST - 1)
    with caplog.at_level(logging.INFO, logger="processor.group.signals"):
        supervisor._handle("add")
        supervisor._handle("add")
    assert supervisor._target_count() == MAX_CONSUMERS_PER_HOST
    assert f"SIGTTIN: consumers {MAX_CONSUMERS_PER_HOST - 1} -> {MAX_CONSUMERS_PER_HOST}" in (
        caplog.text
    )
    assert (
        f"SIGTTIN ignored: {MAX_CONSUMERS_PER_HOST} consumers is the most one daemon runs"
        in caplog.text
    )


def test_the_entry_point_holds_every_signal_the_supervisor_handles():
    assert set(DAEMON_SIGNALS) == set(BLOCKED)


@pytest.mark.parametrize("name", ["CONSUMERS_COUNT", "MAX_CONSUMERS"])
def test_the_bound_is_in_the_help(name):
    (option,) = [option for option in DAEMON_OPTIONS if option.env == name]
    assert f"at most {MAX_CONSUMERS_PER_HOST}" in option.help
