"""The README's recipe for publish order: the output stream is in the order writes landed, and
a reader that needs each publisher's order restores it from fields the publisher put in the
message, which the daemon keeps in ``data``. The recipe is run as the README prints it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import wait_until
from tests.test_e2e import CHANNEL, OUTPUT, WAIT_S, start_daemon, stop_daemon

Recipe = Callable[..., Iterator[dict[str, Any]]]


@pytest.fixture(scope="module")
def in_publish_order() -> Recipe:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Order of the output") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "the README's order section has no Python block"
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # what users copy is what runs
    return namespace["in_publish_order"]


def entry(landed_ms: int, publisher: str, seq: int) -> tuple[str, dict[str, str]]:
    data = {"message_id": f"{publisher}-{seq}", "publisher": publisher, "seq": seq}
    return f"{landed_ms}-0", {"message_id": data["message_id"], "data": json.dumps(data)}


def order(recipe: Recipe, entries: Iterable[tuple[str, dict[str, str]]], **kw: int) -> list[str]:
    return [message["message_id"] for message in recipe(entries, **kw)]


def test_messages_that_land_late_are_put_back_in_each_publishers_order(in_publish_order):
    entries = [
        entry(100, "a", 1),  # a-0 is late: taken over from a consumer that died
        entry(101, "b", 0),
        entry(102, "a", 2),
        entry(150, "b", 2),
        entry(900, "a", 0),
        entry(901, "b", 1),
    ]
    assert order(in_publish_order, entries, window_ms=1000) == [
        "b-0", "a-0", "a-1", "a-2", "b-1", "b-2",
    ]  # fmt: skip


def test_a_missing_number_is_given_up_once_writes_landed_a_window_later(in_publish_order):
    lost = [entry(100, "a", 0), entry(200, "a", 2), entry(1199, "a", 3)]
    # Held: a-1 may still come, until a write lands window_ms after the oldest held (a-2).
    assert order(in_publish_order, lost, window_ms=1000) == ["a-0"]
    later = [*lost, entry(1200, "a", 4)]
    assert order(in_publish_order, later, window_ms=1000) == ["a-0", "a-2", "a-3", "a-4"]


def test_the_daemons_output_is_put_back_in_publish_order(procs, redis_url, r, in_publish_order):
    """Two publishers' numbered messages through three consumers: the stream holds them in the
    order the writes landed; the recipe, on the fields the daemon wrote, gives publish order."""
    count = 300
    daemon, _ = start_daemon(procs, redis_url, 3)
    published = []
    for seq in range(count):
        for publisher in ("a", "b"):
            message = {"message_id": f"{publisher}-{seq}", "publisher": publisher, "seq": seq}
            assert r.publish(CHANNEL, json.dumps(message)) == 2  # the two readers
            published.append(message["message_id"])
    wait_until(lambda: r.xlen(OUTPUT) >= len(published), WAIT_S, message="output incomplete")
    stop_daemon(daemon)

    entries = r.xrange(OUTPUT)
    landed = [fields["message_id"] for _, fields in entries]
    assert sorted(landed) == sorted(published)
    restored = order(in_publish_order, entries)
    assert [m for m in restored if m.startswith("a-")] == [f"a-{seq}" for seq in range(count)]
    assert [m for m in restored if m.startswith("b-")] == [f"b-{seq}" for seq in range(count)]
    moved = sum(1 for got, sent in zip(landed, published, strict=True) if got != sent)
    print(f"{moved} of {len(published)} entries landed away from their publish position")
