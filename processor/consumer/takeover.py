"""A takeover's pre-check: what another consumer may have missed, less what is already written,
so the handler runs only where needed."""

from __future__ import annotations

from processor.consumer.dedup import SeenCheck
from processor.consumer.messages import Entry, Message
from processor.store.connection import CONNECTION_ERRORS


def without_written(
    seen: SeenCheck, entries: list[Entry | None], messages: list[tuple[int, Message]]
) -> tuple[list[Entry | None], list[tuple[int, Message]]]:
    """Drops what is already written from a parsed batch: ``entries`` has None where
    ``messages`` holds the message at that position, still to run through the handler."""
    by_position = dict(messages)
    dedup_ids = [
        by_position[position].message_id if entry is None else entry.dedup_id
        for position, entry in enumerate(entries)
    ]
    try:
        written = seen.seen(dedup_ids)
    except CONNECTION_ERRORS:
        return entries, messages  # the write will retry, and its check still decides
    kept_entries: list[Entry | None] = []
    kept_messages: list[tuple[int, Message]] = []
    for position, (entry, done) in enumerate(zip(entries, written, strict=True)):
        if done:
            continue
        if entry is None:
            kept_messages.append((len(kept_entries), by_position[position]))
        kept_entries.append(entry)
    return kept_entries, kept_messages
