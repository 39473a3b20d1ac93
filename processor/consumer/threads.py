"""Threads that cannot die quietly: an unexpected exception reaches one place that decides.

A consumer whose reader died stays registered while deaf; one whose heartbeat died keeps its
share until the heartbeat expires. Every thread of a consumer is a :class:`WatchedThread`, so
the consumer hears of such a death at once and leaves the group (the others take over its
share) instead of lingering half-dead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

OnFailure = Callable[[str, BaseException], None]


class WatchedThread(threading.Thread):
    """Runs ``work()``; an exception it lets escape goes to ``on_failure`` with the thread name."""

    def __init__(self, name: str, on_failure: OnFailure) -> None:
        super().__init__(name=name, daemon=True)
        self._on_failure = on_failure

    def run(self) -> None:
        try:
            self.work()
        except BaseException as error:  # whatever it is, a silent death is the worst outcome
            self._on_failure(self.name, error)

    def work(self) -> None:
        raise NotImplementedError
