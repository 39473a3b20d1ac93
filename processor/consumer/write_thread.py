"""The write thread: one script call in flight while the consumer prepares the next batch."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

from processor.consumer.messages import Entry
from processor.consumer.threads import OnFailure, WatchedThread
from processor.consumer.writer import Writer, WriteResult
from processor.errors import WriterGone

# How often a blocked submit or wait checks that the write thread still lives.
_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Batch:
    entries: list[Entry]
    received_at: float | None  # monotonic arrival of its oldest message, when known


class WriteThread(WatchedThread):
    """Writes batches in order on its own thread.

    The consumer processes the next batch while the script call for the previous one is in
    flight; at most ``depth`` batches wait, so a slow Redis slows the consumer instead of
    filling its memory (the subscriber keeps draining the socket regardless).
    """

    def __init__(
        self,
        writer: Writer,
        identity: Callable[[], tuple[str, str]],
        on_done: Callable[[Batch, WriteResult | None, float], None],
        on_failure: OnFailure,
        depth: int = 2,
    ) -> None:
        super().__init__("writer", on_failure)
        self._writer = writer
        self._identity = identity
        self._on_done = on_done
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        # The batch being written (set and cleared by the write thread only).
        self._current: Batch | None = None

    def submit(self, entries: list[Entry], received_at: float | None = None) -> None:
        """Queues a batch; ``received_at`` is when its oldest message arrived, if known."""
        self._put(Batch(entries, received_at))

    def wait_idle(self) -> None:
        """Returns once every submitted batch has been written (or the thread has died)."""
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks and self.is_alive():
                done.wait(_POLL_S)

    def holding(self) -> int:
        """Entries submitted and not written yet: queued, or in the call being retried."""
        with self._queue.mutex:
            queued = sum(len(batch.entries) for batch in self._queue.queue if batch is not None)
        current = self._current
        return queued + (len(current.entries) if current is not None else 0)

    def close(self) -> None:
        if self.is_alive():
            self._put(None)
            self.join()

    def _put(self, item: Batch | None) -> None:
        while True:
            if not self.is_alive():
                raise WriterGone("the write thread has died")
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def work(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                self._current = batch
                consumer_id, fence = self._identity()
                started = time.monotonic()
                result = self._writer.write(batch.entries, consumer_id, fence)
                self._on_done(batch, result, started)
                self._current = None
            finally:
                self._queue.task_done()
