"""The hand-off from the reader thread to the processing loop, and how batches are cut.

The reader puts whole chunks (the messages of one socket read) so the cost of the hand-off is
per read, not per message. A batch is cut when it is full or when its oldest message has waited
``window_s``, so a slow trickle is not held back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class Inbox:
    def __init__(self) -> None:
        self._chunks: deque[tuple[float, list[bytes]]] = deque()
        self._count = 0
        self._ready = threading.Condition()
        # When the oldest message of the last batch taken arrived (for the latency metric).
        self.oldest_taken: float | None = None

    def __len__(self) -> int:
        return self._count

    def put(self, chunk: list[bytes]) -> None:
        with self._ready:
            self._chunks.append((time.monotonic(), chunk))
            self._count += len(chunk)
            self._ready.notify()

    def take(self, limit: int, window_s: float, idle_wait_s: float) -> list[bytes]:
        """Up to ``limit`` messages; waits ``idle_wait_s`` at most for the first one."""
        with self._ready:
            if not self._count and not self._ready.wait_for(lambda: self._count > 0, idle_wait_s):
                return []
            flush_at = self._chunks[0][0] + window_s
            while self._count < limit:
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            return self._pop(limit)

    def held_since(self) -> float | None:
        """When the oldest message we hold arrived: waiting, or in the batch taken last until
        the consumer is done with it (it clears ``oldest_taken``)."""
        with self._ready:
            waiting = self._chunks[0][0] if self._chunks else None
        return min((t for t in (waiting, self.oldest_taken) if t is not None), default=None)

    def keep(self, kept: Callable[[list[bytes]], list[bytes]]) -> int:
        """Replaces each waiting chunk by ``kept(chunk)``; returns how many messages left."""
        with self._ready:
            left = 0
            chunks: deque[tuple[float, list[bytes]]] = deque()
            for arrived, chunk in self._chunks:
                remaining = kept(chunk)
                left += len(chunk) - len(remaining)
                if remaining:
                    chunks.append((arrived, remaining))
            self._chunks = chunks
            self._count -= left
            return left

    def drain(self) -> list[bytes]:
        with self._ready:
            return self._pop(self._count)

    def _pop(self, limit: int) -> list[bytes]:
        batch: list[bytes] = []
        self.oldest_taken = self._chunks[0][0] if self._chunks else None
        while self._chunks and len(batch) < limit:
            arrived, chunk = self._chunks.popleft()
            room = limit - len(batch)
            if len(chunk) > room:
                self._chunks.appendleft((arrived, chunk[room:]))
                chunk = chunk[:room]
            batch.extend(chunk)
        self._count -= len(batch)
        return batch
