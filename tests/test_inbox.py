"""The reader → processing hand-off: batch size, batch window, idle wait and order."""

from __future__ import annotations

import threading
import time

from processor.consumer.inbox import Inbox


def _items(start: int, stop: int) -> list[bytes]:
    return [b"m-%d" % index for index in range(start, stop)]


def test_take_returns_at_most_limit() -> None:
    inbox = Inbox()
    inbox.put(_items(0, 10))
    assert inbox.take(limit=4, window_s=0.0, idle_wait_s=0.1) == _items(0, 4)
    assert len(inbox) == 6


def test_full_batch_is_returned_without_waiting_for_the_window() -> None:
    inbox = Inbox()
    inbox.put(_items(0, 100))
    started = time.monotonic()
    assert inbox.take(limit=100, window_s=30.0, idle_wait_s=30.0) == _items(0, 100)
    assert time.monotonic() - started < 5.0


def test_partial_batch_is_returned_after_the_window() -> None:
    inbox = Inbox()
    inbox.put(_items(0, 3))
    started = time.monotonic()
    batch = inbox.take(limit=100, window_s=0.2, idle_wait_s=30.0)
    elapsed = time.monotonic() - started
    assert batch == _items(0, 3)
    assert elapsed >= 0.15  # it waited for more, up to the window
    assert elapsed < 5.0
    assert len(inbox) == 0


def test_window_counts_from_the_oldest_message() -> None:
    inbox = Inbox()
    inbox.put(_items(0, 1))
    time.sleep(0.5)  # lets the message age; nothing to synchronise with
    started = time.monotonic()
    assert inbox.take(limit=100, window_s=0.5, idle_wait_s=30.0) == _items(0, 1)
    assert time.monotonic() - started < 0.4  # not a fresh 0.5 s window


def test_empty_inbox_returns_nothing_after_the_idle_wait() -> None:
    inbox = Inbox()
    started = time.monotonic()
    assert inbox.take(limit=10, window_s=0.01, idle_wait_s=0.2) == []
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 5.0


def test_a_put_wakes_a_waiting_take() -> None:
    inbox = Inbox()
    result: list[bytes] = []
    waiting = threading.Event()

    def consume() -> None:
        waiting.set()
        result.extend(inbox.take(limit=5, window_s=30.0, idle_wait_s=30.0))

    thread = threading.Thread(target=consume)
    started = time.monotonic()
    thread.start()
    waiting.wait(5)
    for index in range(5):
        inbox.put(_items(index, index + 1))
    thread.join(timeout=10)
    assert not thread.is_alive()
    # It returned when the batch was full, not after the 30 s window or idle wait.
    assert time.monotonic() - started < 10
    assert result == _items(0, 5)


def test_chunk_splitting_keeps_order() -> None:
    inbox = Inbox()
    inbox.put(_items(0, 5))
    inbox.put(_items(5, 7))
    inbox.put(_items(7, 12))
    taken: list[bytes] = []
    sizes: list[int] = []
    while len(inbox):
        batch = inbox.take(limit=3, window_s=0.0, idle_wait_s=0.1)
        sizes.append(len(batch))
        taken.extend(batch)
    assert taken == _items(0, 12)
    assert sizes == [3, 3, 3, 3]


def test_drain_returns_everything_in_order() -> None:
    inbox = Inbox()
    inbox.put(_items(0, 4))
    inbox.put(_items(4, 9))
    assert inbox.take(limit=2, window_s=0.0, idle_wait_s=0.1) == _items(0, 2)
    assert inbox.drain() == _items(2, 9)
    assert len(inbox) == 0
    assert inbox.drain() == []


def test_concurrent_puts_lose_nothing() -> None:
    inbox = Inbox()
    total = 20_000

    def produce() -> None:
        for start in range(0, total, 50):
            inbox.put(_items(start, start + 50))

    producer = threading.Thread(target=produce)
    producer.start()
    taken: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(taken) < total and time.monotonic() < deadline:
        taken.extend(inbox.take(limit=128, window_s=0.005, idle_wait_s=0.1))
    producer.join(timeout=10)
    assert taken == _items(0, total)
