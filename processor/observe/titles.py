"""Process titles as ``ps`` and ``top`` show them: ``processor: supervisor ...`` and
``processor: consumer <slot> <consumer id>``, not a spawned interpreter's command line.

Like logging, titles are set by entry points only: a consumer run inside another program
(a test) keeps that program's title.
"""

from __future__ import annotations

import setproctitle

from processor.config import Settings

PREFIX = "processor: "
CONSUMER = PREFIX + "consumer"


def supervisor_title(settings: Settings) -> str:
    """The daemon's host id, Redis (password masked) and channel: which daemon this is."""
    return f"{PREFIX}supervisor {settings.host} {settings.safe_url} {settings.input_channel}"


def consumer_title(slot: int, consumer_id: str) -> str:
    return f"{CONSUMER} {slot} {consumer_id or '(joining)'}"


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)


def retitle_consumer(slot: int, consumer_id: str) -> None:
    """The consumer's id in its title once it has one (again, after a rejoin), in a consumer
    process only: one whose entry point titled it."""
    if setproctitle.getproctitle().startswith(CONSUMER):
        set_title(consumer_title(slot, consumer_id))
