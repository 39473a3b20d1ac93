"""Ctrl-C and SIGTERM for a one-shot command that works in steps (``processor replay``).

The first signal only asks the command to stop after the step in hand: each step is one atomic
script call, so stopping between two leaves nothing half done, and the command can still say
what it did. It also puts the default action back, so a second signal ends the process at once
(no traceback: the default action of both signals is to terminate), for a command stuck waiting
on Redis.
"""

from __future__ import annotations

import signal
from types import FrameType

from processor.errors import ExitCode

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# 128 + the signal's number, as a shell reports a command a signal ended.
BY_SIGNAL = {signal.SIGINT: ExitCode.INTERRUPTED, signal.SIGTERM: ExitCode.TERMINATED}


class Interrupt:
    """Whether, and by which signal, the command was asked to stop."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    def install(self) -> Interrupt:
        for signum in SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum)
        for other in SIGNALS:
            signal.signal(other, signal.SIG_DFL)

    def exit_code(self) -> ExitCode | None:
        """The code the command exits with when it stopped for the signal; None before one."""
        return None if self.signal is None else BY_SIGNAL[self.signal]
