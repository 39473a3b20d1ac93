"""What ``processor replay`` says: each dead letter's outcome as it is replayed, then a count.

A line is printed (and flushed) as each script call returns, so a long replay shows its progress
and a stopped one has said what it did; ``--json`` prints the list once the run ends, however it
ended.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict, dataclass

REPLAYED = "replayed"
NOT_RECEIVED = "not received"
GONE = "gone"
NOT_REPLAYABLE = "not replayable"


@dataclass(frozen=True)
class Outcome:
    """What became of one chosen dead letter."""

    entry_id: str
    message_id: str
    reason_code: str
    outcome: str  # REPLAYED, NOT_RECEIVED, GONE or NOT_REPLAYABLE
    receivers: int = 0  # subscribers the publish reached (PUBLISH's reply)
    forgotten: bool = False  # its message_id forgotten in the dedup window first

    def line(self) -> str:
        what = f"{self.entry_id}  {self.message_id or '-'}  {self.reason_code}: "
        if self.outcome == REPLAYED:
            forgot = "" if self.forgotten else " (its id left as it was: replayed since this entry)"
            return what + f"replayed, received by {self.receivers} subscribers{forgot}"
        if self.outcome == NOT_RECEIVED:
            return what + "published, but no subscriber received it: kept"
        if self.outcome == GONE:
            return what + "gone: already replayed, or trimmed"
        return what + "not replayed: it would fail validation again"


class Report:
    """The outcomes of one run, printed as they come."""

    def __init__(self, as_json: bool, named: bool) -> None:
        self._json = as_json
        # Dead letters named by --id or --message-id: one that is not replayable is missed.
        self._named = named
        self._chosen: int | None = None
        self.outcomes: list[Outcome] = []

    def begin(self, chosen: int) -> None:
        """``chosen`` dead letters were found and are about to be replayed."""
        self._chosen = chosen

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if not self._json:
            print(outcome.line(), flush=True)

    def missed(self) -> bool:
        """Whether a chosen dead letter was not replayed (--reason and --all pass over what
        failed validation)."""
        return any(
            outcome.outcome != REPLAYED and (self._named or outcome.outcome != NOT_REPLAYABLE)
            for outcome in self.outcomes
        )

    def close(self, interrupted: signal.Signals | None) -> None:
        """The count, or what was left when the run stopped early; nothing before ``begin``."""
        if self._chosen is None:
            return
        left = self._chosen - len(self.outcomes)
        if left > 0 and not self.outcomes and interrupted is None:
            return  # an error before the first replay: its own line says it all
        if self._json:
            print(json.dumps([asdict(outcome) for outcome in self.outcomes], indent=2))
        replayed = sum(outcome.outcome == REPLAYED for outcome in self.outcomes)
        if left <= 0:
            if not self._json:
                print(f"{replayed} of {len(self.outcomes)} dead letters replayed")
            return
        why = f"interrupted by {interrupted.name}" if interrupted else "stopped by an error"
        # With --json, stdout stays the list for scripts.
        print(
            f"{why}: {replayed} of {self._chosen} dead letters replayed; {left} not tried, left "
            "in the stream (run the command again for them)",
            file=sys.stderr if self._json else sys.stdout,
            flush=True,
        )
