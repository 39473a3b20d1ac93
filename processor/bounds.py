"""AUTOSCALE's ``MIN:MAX``: the bounds the group's size is kept within."""

from __future__ import annotations

from dataclasses import dataclass

from processor.errors import ConfigError


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
