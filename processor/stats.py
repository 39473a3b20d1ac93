"""Counters a consumer shares with its supervisor, in shared memory (no locks: one writer)."""

from __future__ import annotations

from multiprocessing.context import BaseContext
from typing import Any

FIELDS = ("received", "written", "dead", "skipped", "taken_over", "gaps", "buffered")


class ConsumerStats:
    """One consumer slot's counters and current id; picklable to a spawned child."""

    def __init__(self, context: BaseContext) -> None:
        self._values: Any = context.RawArray("q", len(FIELDS))
        self._ident: Any = context.RawArray("c", 160)

    def set(self, **values: int) -> None:
        for name, value in values.items():
            self._values[FIELDS.index(name)] = value

    def add(self, name: str, amount: int) -> None:
        self._values[FIELDS.index(name)] += amount

    def get(self, name: str) -> int:
        return int(self._values[FIELDS.index(name)])

    def snapshot(self) -> dict[str, int]:
        return {name: int(self._values[index]) for index, name in enumerate(FIELDS)}

    @property
    def consumer_id(self) -> str:
        return bytes(self._ident.value).decode()

    @consumer_id.setter
    def consumer_id(self, value: str) -> None:
        self._ident.value = value.encode()[:159]
