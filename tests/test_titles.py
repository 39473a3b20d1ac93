"""Process titles: what ps and top show of the daemon's processes."""

from __future__ import annotations

from pathlib import Path

import redis
import setproctitle

from processor.observe.titles import retitle_consumer
from tests.conftest import Processes
from tests.helpers import wait_until

CONSUMERS = "consumer:ids"
WAIT_S = 30.0


def cmdline(pid: int) -> str:
    """What ps shows as the process's command line."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The fields after the command name, which may itself hold spaces and parentheses.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def test_the_supervisor_and_each_consumer_carry_a_title(
    procs: Processes, redis_url: str, r: redis.Redis
):
    env = {"REDIS_URL": redis_url, "CONSUMERS_COUNT": "2", "HOST_ID": "title-host"}
    daemon = procs.start(["demo/consume.py"], env=env)

    def listed() -> bool:
        assert daemon.poll() is None, procs.output(daemon)
        return r.llen(CONSUMERS) == 2

    wait_until(listed, WAIT_S, message="consumers not listed in time")
    ids = r.lrange(CONSUMERS, 0, -1)
    # Slot numbers from the ids (host-pid-slot-random); each is registered before it is titled.
    expected = {f"processor: consumer {i.split('-')[-2]} {i}" for i in ids}

    def consumer_titles() -> set[str]:
        titles = {cmdline(pid) for pid in children(daemon.pid)}
        return {title for title in titles if title.startswith("processor: consumer")}

    wait_until(
        lambda: consumer_titles() == expected,
        WAIT_S,
        message=f"consumer titles {consumer_titles()} are not {expected}",
    )
    assert cmdline(daemon.pid) == (
        f"processor: supervisor title-host {redis_url} messages:published"
    )


def test_a_consumer_run_inside_another_program_keeps_its_title():
    before = setproctitle.getproctitle()
    retitle_consumer(0, "some-id")
    assert setproctitle.getproctitle() == before
