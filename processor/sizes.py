"""How many consumers: the most one daemon runs, and the bounds autoscale keeps the group in."""

from __future__ import annotations

from dataclasses import dataclass

from processor.errors import ConfigError

# The most consumer processes one daemon runs: far above what any host has cores for (each is a
# Python process with its own connections), low enough that a typo (CONSUMERS_COUNT=100000)
# cannot fork-bomb the host or exhaust Redis's clients.
MAX_CONSUMERS_PER_HOST = 256


def consumer_count_problem(count: int) -> str | None:
    if count <= MAX_CONSUMERS_PER_HOST:
        return None
    return (
        f"{count} is more than {MAX_CONSUMERS_PER_HOST}, the most consumer processes one "
        "daemon runs (run more hosts instead)"
    )


@dataclass(frozen=True)
class Bounds:
    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"


def parse_bounds(text: str) -> Bounds | None:
    """``MIN:MAX`` from AUTOSCALE; None when empty (autoscale off)."""
    if not text.strip():
        return None
    low_text, colon, high_text = text.partition(":")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        low = high = 0
    if not colon or low < 1 or high < low:
        raise ConfigError(
            f"invalid AUTOSCALE: {text!r} must be MIN:MAX with 1 <= MIN <= MAX (for example 1:8)"
        )
    return Bounds(low, high)
