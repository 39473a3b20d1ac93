"""What the daemon checks before any consumer starts: that the server is new enough (Redis 6.2,
any Valkey), lets it in and do everything it needs, that the keys it writes hold their types,
the cluster's PARTITIONS, eviction, and the Pub/Sub output limit."""

from __future__ import annotations

import logging
import threading

import redis

from processor.config import Settings
from processor.consumer.backlog import warn_if_cut_off_unwarned
from processor.consumer.dedup import warn_if_evicting
from processor.errors import RetryStopped
from processor.group.controlplane import claim_partitions
from processor.store.access import check_access, retry_at_start, startup_deadline
from processor.store.connection import REDIS_ERRORS, command_client
from processor.store.keys import Keys
from processor.store.keytypes import check_key_types
from processor.store.outage import Backoff, Outage, Retrier

log = logging.getLogger(__name__)


def connect_and_check(settings: Settings, keys: Keys, stop: threading.Event) -> redis.Redis | None:
    """The supervisor's client, once Redis answers and every check passed; None if stopped
    first. Raises ConfigError (a wrong setting, a key of the wrong type, a server older than
    Redis 6.2) or StartupTimeout."""
    warn_if_one_reader(settings)
    deadline = startup_deadline(settings)
    check_access(settings, stop, deadline)
    client = _connect(settings, stop, deadline)
    if client is None:
        return None
    try:
        check_key_types(client, keys)
    except REDIS_ERRORS as error:
        log.warning("could not check the types of the daemon's keys: %s", error)
    if keys.cluster:
        try:
            # Raises ConfigError (exit 2) when the live group runs with another PARTITIONS.
            claim_partitions(client, keys, settings.partitions)
        except REDIS_ERRORS as error:
            log.warning("could not check PARTITIONS against the group's: %s", error)
    try:
        warn_if_evicting(client, keys.cluster)
    except REDIS_ERRORS as error:
        log.warning("could not check Redis's maxmemory-policy: %s", error)
    try:
        warn_if_cut_off_unwarned(client, settings.backlog_warn_bytes)
    except REDIS_ERRORS as error:
        log.warning("could not check Redis's Pub/Sub output limit: %s", error)
    return client


def warn_if_one_reader(settings: Settings) -> None:
    if settings.readers_per_host == 1 < settings.consumers_count and settings.strategy != "race":
        log.warning(
            "READERS_PER_HOST=1: one copy of each message on this host; what the reader held "
            "alone is lost with it (2 or more keep a copy while one reader lives)"
        )


def _connect(
    settings: Settings, stop: threading.Event, deadline: float | None
) -> redis.Redis | None:
    """Made once Redis answers (a cluster client reads the layout as it is made, so a cluster
    that went away since the start-up check is waited for); None if stopped. Raises
    StartupTimeout past ``deadline``."""
    if stop.is_set():
        return None
    outage = Outage("Redis (supervisor)", url=settings.url)
    backoff = Backoff(0.1, settings.reconnect_backoff_max_s)
    retrier = Retrier(outage, backoff, stop, errors=REDIS_ERRORS)
    try:
        # Short timeouts: an eviction must never hold up the replacement of a consumer.
        return retry_at_start(
            settings,
            retrier,
            lambda: command_client(settings, name="processor-supervisor", timeout_s=1.0),
            deadline,
        )
    except RetryStopped:
        return None
