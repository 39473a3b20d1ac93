"""Loading the settings of each command, and the rules that span several settings.

:func:`~processor.options.load` reads one settings class from defaults < TOML file <
environment < flags and checks each value on its own; the ``check_*`` functions here add the
rules between values (partitions need a cluster, two settings may not name one key, the takeover
buffer must outlive a dead consumer's detection...). Nothing else in the package reads
``os.environ``.

The other commands read the daemon's own file (``--config``), so that an operator's tools find
the keys the daemon writes: each takes the settings it reads and passes over the daemon's
others; a key that is no setting at all is still refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence

from processor.bounds import parse_bounds
from processor.config import (
    DAEMON_OPTIONS,
    MAX_BATCH_SIZE,
    GroupSettings,
    PublisherSettings,
    RedisSettings,
    Settings,
    StatusSettings,
)
from processor.errors import ConfigError
from processor.options import load, load_with_args
from processor.store.partitions import MAX_PARTITIONS
from processor.urls import database


def check_redis(settings: RedisSettings) -> None:
    """Partitions need a cluster; TLS files only mean something with a rediss:// URL."""
    if settings.partitions > 1 and not settings.redis_cluster:
        raise ConfigError(
            f"invalid PARTITIONS: {settings.partitions} partitions spread the load over the "
            "shards of a Redis Cluster; set REDIS_CLUSTER=true (on one Redis they only add work)"
        )
    if settings.partitions > MAX_PARTITIONS:
        raise ConfigError(
            f"invalid PARTITIONS: {settings.partitions} is more than {MAX_PARTITIONS}"
        )
    if settings.redis_cluster and settings.url.startswith("unix://"):
        raise ConfigError(
            f"invalid REDIS_URL: {settings.safe_url} is a unix socket; REDIS_CLUSTER needs a "
            "node's redis:// or rediss:// address (the other nodes are found from it)"
        )
    if settings.redis_cluster and database(settings.url) != 0:
        raise ConfigError(
            f"invalid REDIS_URL: {settings.safe_url} selects database "
            f"{database(settings.url)}; a Redis Cluster has database 0 only"
        )
    if settings.redis_cluster:
        _check_untagged("INPUT_CHANNEL", settings.input_channel)
    if not settings.tls_options:
        return
    if not settings.url.startswith("rediss://"):
        raise ConfigError(
            "invalid REDIS_TLS_*_FILE: TLS files are set but REDIS_URL is not a rediss:// URL "
            f"({settings.safe_url})"
        )
    for name, path in (
        ("REDIS_TLS_CA_FILE", settings.redis_tls_ca_file),
        ("REDIS_TLS_CERT_FILE", settings.redis_tls_cert_file),
        ("REDIS_TLS_KEY_FILE", settings.redis_tls_key_file),
    ):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"invalid {name}: cannot read {path!r}")
    if bool(settings.redis_tls_cert_file) != bool(settings.redis_tls_key_file):
        raise ConfigError("invalid REDIS_TLS_CERT_FILE/REDIS_TLS_KEY_FILE: give both or neither")


def _check_untagged(name: str, value: str) -> None:
    if "{" in value or "}" in value:
        raise ConfigError(
            f"invalid {name}: {value!r} has a hash tag; with REDIS_CLUSTER the daemon tags "
            "its keys itself (give the name without braces)"
        )


def check_group(settings: GroupSettings) -> None:
    """Two streams, not one; on a cluster the daemon adds the hash tags itself: the names must
    not carry their own."""
    check_redis(settings)
    _check_distinct_keys(settings)
    if not settings.redis_cluster:
        return
    for name, value in (
        ("OUTPUT_STREAM", settings.output_stream),
        ("DEAD_LETTER_STREAM", settings.dead_letter_stream),
        ("KEY_PREFIX", settings.key_prefix),
        ("CONSUMERS_LIST", settings.consumers_list),
    ):
        _check_untagged(name, value)


def _check_distinct_keys(settings: GroupSettings) -> None:
    """Each key the daemon writes is named by one setting: two settings naming one key would
    write a stream into a list (WRONGTYPE on every write) or mix dead letters into the output."""
    named = [
        ("OUTPUT_STREAM", settings.output_stream),
        ("DEAD_LETTER_STREAM", settings.dead_letter_stream),
        ("CONSUMERS_LIST", settings.consumers_list),
    ]
    own = f"{settings.key_prefix}:"
    for index, (name, value) in enumerate(named):
        for other, other_value in named[:index]:
            if value == other_value:
                raise ConfigError(
                    f"invalid {name}: {value!r} is {other} too; each needs a key of its own"
                )
        if value.startswith(own):
            raise ConfigError(
                f"invalid {name}: {value!r} is under KEY_PREFIX ({settings.key_prefix!r}), "
                "where the daemon keeps its own keys; give it a name outside that prefix"
            )


def check_daemon(settings: Settings) -> None:
    """Cross-field rules: the takeover buffer must outlive a dead consumer's detection."""
    check_group(settings)
    parse_bounds(settings.autoscale)
    if settings.processing_batch_size > MAX_BATCH_SIZE:
        raise ConfigError(
            f"invalid PROCESSING_BATCH_SIZE: {settings.processing_batch_size} is more than "
            f"{MAX_BATCH_SIZE} (the write script passes a batch's digests to one Redis command)"
        )
    if settings.heartbeat_ttl_ms <= settings.heartbeat_interval_ms:
        raise ConfigError(
            f"invalid HEARTBEAT_TTL_MS: {settings.heartbeat_ttl_ms} must be greater than "
            f"HEARTBEAT_INTERVAL_MS ({settings.heartbeat_interval_ms})"
        )
    detection_ms = settings.detection_ms
    if settings.takeover_buffer_ms <= detection_ms:
        raise ConfigError(
            f"invalid TAKEOVER_BUFFER_MS: {settings.takeover_buffer_ms} must exceed the time to "
            "detect a dead consumer "
            f"(HEARTBEAT_TTL_MS + 2 x HEARTBEAT_INTERVAL_MS = {detection_ms})"
        )
    if settings.dedup_window_ms <= 2 * settings.takeover_buffer_ms:
        raise ConfigError(
            f"invalid DEDUP_WINDOW_MS: {settings.dedup_window_ms} must exceed twice "
            f"TAKEOVER_BUFFER_MS ({settings.takeover_buffer_ms}) so a takeover never outlives the "
            "dedup window"
        )


def check_publisher(settings: PublisherSettings) -> None:
    check_redis(settings)
    if settings.pause_max_ms < settings.pause_min_ms:
        raise ConfigError(
            f"invalid PAUSE_MAX_MS: {settings.pause_max_ms} is below PAUSE_MIN_MS "
            f"({settings.pause_min_ms})"
        )


def load_daemon_settings(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, prog: str = "processor consume"
) -> Settings:
    return load(
        Settings,
        argv,
        os.environ if environ is None else environ,
        prog=prog,
        description="Consume a Redis Pub/Sub channel into an exactly-once Redis Stream.",
        extra_check=check_daemon,
    )


def load_status_settings(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, prog: str = "processor status"
) -> StatusSettings:
    return load(
        StatusSettings,
        argv,
        os.environ if environ is None else environ,
        prog=prog,
        description="Show the consumer group: live consumers, counts, streams, dead letters, gaps.",
        extra_check=check_group,
        others=DAEMON_OPTIONS,
    )


def load_group_command(
    argv: Sequence[str],
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[GroupSettings, argparse.Namespace]:
    """Settings and arguments of a command that steers the group (scale, stop, start)."""
    return load_with_args(
        GroupSettings,
        argv,
        os.environ if environ is None else environ,
        prog=prog,
        description=description,
        extra_check=check_group,
        add_arguments=add_arguments,
        others=DAEMON_OPTIONS,
    )


def load_publisher_settings(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, prog: str = "processor publish"
) -> PublisherSettings:
    return load(
        PublisherSettings,
        argv,
        os.environ if environ is None else environ,
        prog=prog,
        description="Publish bursts of JSON messages to a Redis Pub/Sub channel.",
        extra_check=check_publisher,
        others=DAEMON_OPTIONS,
    )


def count_arg(text: str, hint: str = "") -> int:
    """An argparse type: a whole number, at least 1; ``hint`` follows the "at least 1"."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} must be at least 1{hint}")
    return count
