"""Settings of the daemon and the publisher, modelled once.

Every setting is one dataclass field, declared with :func:`~processor.options.setting`: its
default, environment variable, help and bounds in one place (the flag is the field's name).
:func:`~processor.options.load` builds the frozen dataclass from defaults < TOML file <
environment < command-line flags and validates it. Nothing else in the package reads
``os.environ``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.connection import parse_url

from processor.errors import ConfigError
from processor.options import load, load_with_args, options_of, setting
from processor.store.partitions import MAX_PARTITIONS

STRATEGIES = ("partitioned", "race")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
URL_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_PORT = 65535
# The most consumer processes one daemon runs: far above what any host has cores for (each is a
# Python process with its own connections), low enough that a typo (CONSUMERS_COUNT=100000)
# cannot fork-bomb the host or exhaust Redis's clients.
MAX_CONSUMERS_PER_HOST = 256
WAIT_MODES = ("degrade", "strict")


def _secret_free(url: str) -> str:
    """The URL with its password masked, for logs and reprs."""
    parts = urlsplit(url)
    # redis-py also takes ?password=... from the query string.
    query = urlencode(
        [(key, "***" if key == "password" else value) for key, value in parse_qsl(parts.query)],
        safe="*",
    )
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    masked = urlunsplit(parts._replace(netloc=netloc, query=query))
    if not netloc and url.startswith(f"{parts.scheme}://"):
        # urlunsplit drops the "//" of unix:///path: keep the URL as the user wrote it.
        masked = f"{parts.scheme}://{masked.removeprefix(parts.scheme + ':')}"
    return masked


def _shown(url: str) -> str:
    """The URL for an error line, password masked even where it does not parse."""
    if url.startswith(URL_SCHEMES):
        with contextlib.suppress(ValueError):
            return _secret_free(url)
    # Not a URL we can take apart: whatever comes before an "@" may hold a password.
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest.partition('?')[0]}"


def url_problem(url: str) -> str | None:
    """Why redis-py cannot use ``url``, or would read it as something else; None if fine."""
    if not url:
        return None  # REDIS_HOST and REDIS_PORT then
    shown = _shown(url)
    if not url.startswith(URL_SCHEMES):
        return f"{shown!r} is not a redis://, rediss:// or unix:// URL"
    try:
        _parsed(url)  # what redis-py's from_url would refuse: port, brackets, query values
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return f"{shown!r}: {str(error).rstrip('.')}"
    if parts.scheme == "unix":
        if parts.hostname or not parts.path:
            return f"{shown!r}: give the socket's absolute path (unix:///path/to/redis.sock)"
        return None
    if port == 0:
        return f"{shown!r}: port 0 is not a port Redis listens on"
    # redis-py ignores a path that is not a number, and reads /1/2 as database 12.
    if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]+", parts.path):
        return f"{shown!r}: the path {parts.path!r} is not a database number (redis://HOST:PORT/DB)"
    return None


def _host_problem(host: str) -> str | None:
    if url_problem(f"redis://{host}:{MAX_PORT}/0") is None and host.strip():
        return None
    return f"{host!r} is not a host name or address (an IPv6 address goes in brackets: [::1])"


def database(url: str) -> int:
    """The database number a valid URL selects."""
    db = _parsed(url).get("db", 0)
    return db if isinstance(db, int) else 0


def _parsed(url: str) -> dict[str, object]:
    """redis-py's reading of a URL into the client's keyword arguments."""
    return dict(parse_url(url))  # type: ignore[no-untyped-call]


def _consumer_count_problem(count: int) -> str | None:
    if count <= MAX_CONSUMERS_PER_HOST:
        return None
    return (
        f"{count} is more than {MAX_CONSUMERS_PER_HOST}, the most consumer processes one "
        "daemon runs (run more hosts instead)"
    )


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis; shared by the daemon, the publisher and the tools."""

    redis_host: str = setting("localhost", "REDIS_HOST", "Redis host", check=_host_problem)
    redis_port: int = setting(6379, "REDIS_PORT", "Redis port", minimum=1, maximum=MAX_PORT)
    redis_url: str = setting(
        "",
        "REDIS_URL",
        "redis://, rediss:// (TLS) or unix:// URL with user/password; overrides host and port",
        secret=True,
        check=url_problem,
    )
    redis_tls_ca_file: str = setting(
        "", "REDIS_TLS_CA_FILE", "CA certificate(s) to verify the server with (rediss:// URLs)"
    )
    redis_tls_cert_file: str = setting(
        "", "REDIS_TLS_CERT_FILE", "client certificate, when the server asks for one"
    )
    redis_tls_key_file: str = setting("", "REDIS_TLS_KEY_FILE", "the client certificate's key")
    input_channel: str = setting("messages:published", "INPUT_CHANNEL", "Pub/Sub channel to read")
    redis_cluster: bool = setting(
        False,
        "REDIS_CLUSTER",
        "REDIS_URL names a node of a Redis Cluster (7+): sharded Pub/Sub, one hash tag per "
        "partition",
    )
    partitions: int = setting(
        1,
        "PARTITIONS",
        "partitions of the channel and the streams (cluster mode): message_id's CRC32 modulo "
        "this picks one",
        minimum=1,
    )
    loglevel: str = setting("INFO", "LOGLEVEL", "log level", choices=LOG_LEVELS)

    @property
    def url(self) -> str:
        return self.redis_url or f"redis://{self.redis_host}:{self.redis_port}/0"

    @property
    def tls_options(self) -> dict[str, str]:
        """redis-py's keyword arguments for the TLS files that are set."""
        files = {
            "ssl_ca_certs": self.redis_tls_ca_file,
            "ssl_certfile": self.redis_tls_cert_file,
            "ssl_keyfile": self.redis_tls_key_file,
        }
        return {name: path for name, path in files.items() if path}

    @property
    def safe_url(self) -> str:
        return _secret_free(self.url)


@dataclass(frozen=True)
class GroupSettings(RedisSettings):
    """Where one group keeps its streams and bookkeeping: shared by the daemon and the tools."""

    output_stream: str = setting("messages:processed", "OUTPUT_STREAM", "output stream")
    dead_letter_stream: str = setting(
        "messages:dead",
        "DEAD_LETTER_STREAM",
        "stream for invalid messages (not OUTPUT_STREAM)",
    )
    consumers_list: str = setting(
        "consumer:ids",
        "CONSUMERS_LIST",
        "Redis list of live consumer ids",
    )
    key_prefix: str = setting("processor", "KEY_PREFIX", "prefix of the daemon's own keys")


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


@dataclass(frozen=True)
class Settings(GroupSettings):
    """Everything one consumer daemon needs; picklable, so it crosses to the consumer processes."""

    consumers_count: int = setting(
        2,
        "CONSUMERS_COUNT",
        "consumer processes on this host while the group has no desired size in Redis "
        f"(set by 'processor scale', which then wins); at most {MAX_CONSUMERS_PER_HOST}",
        minimum=1,
        check=_consumer_count_problem,
    )
    host_id: str = setting(
        "",
        "HOST_ID",
        "this daemon's id among the group's hosts (default: the machine's host name)",
    )
    max_consumers: int = setting(
        min(os.cpu_count() or 1, MAX_CONSUMERS_PER_HOST),
        "MAX_CONSUMERS",
        f"most consumers this host runs for the group's desired size; at most "
        f"{MAX_CONSUMERS_PER_HOST}",
        minimum=1,
        check=_consumer_count_problem,
    )
    idle_stop_s: float = setting(
        0.0,
        "IDLE_STOP",
        "stop gracefully once the group has received and written nothing for this many "
        "seconds; 0 = never",
        minimum=0,
    )
    autoscale: str = setting(
        "",
        "AUTOSCALE",
        "MIN:MAX: size the whole group from its load between these bounds; empty = off",
    )
    autoscale_interval_s: float = setting(
        5.0,
        "AUTOSCALE_INTERVAL",
        "seconds between the group's autoscale decisions (one host decides each time)",
        minimum=0.5,
    )
    autoscale_cooldown_s: float = setting(
        15.0,
        "AUTOSCALE_COOLDOWN",
        "seconds after a change of the group's size before autoscale changes it again",
        minimum=0,
    )
    processing_batch_size: int = setting(
        100,
        "PROCESSING_BATCH_SIZE",
        "messages written per script call at most, up to 5000 (a batch holds this many per "
        "partition)",
        minimum=1,
    )
    batch_window_ms: int = setting(
        50,
        "BATCH_WINDOW_MS",
        "a partial batch is flushed after this many ms",
        minimum=0,
    )
    monitor_interval_s: float = setting(
        3.0,
        "MONITORING_INTERVAL",
        "seconds between throughput reports",
        minimum=0.1,
    )
    monitor_idle_interval_s: float = setting(
        60.0,
        "MONITORING_IDLE_INTERVAL",
        "seconds between throughput reports while nothing is received, written or dead and "
        "the line does not change",
        minimum=0.1,
    )
    handler: str = setting(
        "processor.handlers:add_random_score",
        "HANDLER",
        "message handler as package.module:function",
    )
    handler_timeout_s: float = setting(
        5.0,
        "HANDLER_TIMEOUT",
        "seconds a handler may run per message; 0 disables",
        minimum=0,
    )
    handler_concurrency: int = setting(
        1,
        "HANDLER_CONCURRENCY",
        "handler calls in flight per consumer",
        minimum=1,
    )
    strategy: str = setting(
        "partitioned",
        "STRATEGY",
        "which messages a consumer tries",
        choices=STRATEGIES,
    )
    lock_ttl_ms: int = setting(
        600_000,
        "LOCK_TTL_MS",
        "dedup window: a message id is written once within it (remembered for between this and "
        "1.5 x this, by Redis's clock)",
        minimum=1000,
    )
    max_message_bytes: int = setting(
        1_048_576,
        "MAX_MESSAGE_BYTES",
        "larger messages are dead-lettered",
        minimum=64,
    )
    heartbeat_interval_ms: int = setting(
        500,
        "HEARTBEAT_INTERVAL_MS",
        "how often a consumer refreshes its heartbeat and reads the group",
        minimum=10,
    )
    heartbeat_ttl_ms: int = setting(
        2_000,
        "HEARTBEAT_TTL_MS",
        "a consumer silent this long is dead",
        minimum=50,
    )
    takeover_buffer_ms: int = setting(
        10_000,
        "TAKEOVER_BUFFER_MS",
        "how long a consumer keeps messages it does not own (time Redis was away or refusing "
        "writes does not count)",
        minimum=100,
    )
    takeover_buffer_max: int = setting(
        500_000,
        "TAKEOVER_BUFFER_MAX",
        "most messages a consumer keeps that it does not own",
        minimum=1,
    )
    backlog_warn_bytes: int = setting(
        4 * 1024 * 1024,
        "BACKLOG_WARN_BYTES",
        "warn when the server holds this many unread bytes for a consumer",
        minimum=1,
    )
    output_maxlen: int = setting(
        0,
        "OUTPUT_MAXLEN",
        "trim the output and dead-letter streams to about this many entries as they are "
        "written (XADD MAXLEN ~); 0 = keep everything",
        minimum=0,
    )
    wait_replicas: int = setting(
        0,
        "WAIT_REPLICAS",
        "after each write, wait (WAIT, up to 1 s) until this many replicas have it, so the "
        "failover of a crashed primary loses no write; 0 = do not wait (it can lose the last "
        "writes)",
        minimum=0,
    )
    wait_replicas_mode: str = setting(
        "degrade",
        "WAIT_REPLICAS_MODE",
        "when fewer than WAIT_REPLICAS replicas confirm a write within 1 s: degrade = accept it "
        "and write to that partition without waiting for 5 s (logged); strict = hold the batch "
        "and wait again until they do (until a stop's grace is over)",
        choices=WAIT_MODES,
    )
    metrics_port: int = setting(
        0,
        "METRICS_PORT",
        "serve Prometheus metrics, /healthz and /readyz on this port; 0 = off",
        minimum=0,
        maximum=MAX_PORT,
    )
    metrics_addr: str = setting(
        "127.0.0.1",
        "METRICS_ADDR",
        "address the metrics endpoint binds (0.0.0.0 for remote scrapes and probes)",
    )
    shutdown_grace_s: float = setting(
        10.0,
        "SHUTDOWN_GRACE",
        "seconds consumers get to flush on shutdown",
        minimum=0.1,
    )
    restart_backoff_max_s: float = setting(
        10.0,
        "RESTART_BACKOFF_MAX",
        "longest pause before a crashed consumer is replaced",
        minimum=0.1,
    )
    reconnect_backoff_max_s: float = setting(
        2.0,
        "RECONNECT_BACKOFF_MAX",
        "longest pause between reconnect attempts",
        minimum=0.01,
    )
    startup_timeout_s: float = setting(
        0.0,
        "STARTUP_TIMEOUT",
        "seconds to wait for Redis at start, before any consumer starts; past it the daemon "
        "exits with code 4; 0 = wait forever",
        minimum=0,
    )

    @property
    def autoscale_bounds(self) -> Bounds | None:
        return parse_bounds(self.autoscale)

    @property
    def host(self) -> str:
        """The host id this daemon registers under."""
        return self.host_id or socket.gethostname()

    def describe(self) -> str:
        """One key=value line for the start-up log, password masked."""
        values = dataclasses.asdict(self)
        values["redis_url"] = self.safe_url
        values.pop("redis_host")
        values.pop("redis_port")
        return " ".join(f"{key}={value}" for key, value in values.items())


@dataclass(frozen=True)
class StatusSettings(GroupSettings):
    """What ``processor status`` needs."""

    json: bool = setting(False, "STATUS_JSON", "print JSON for scripts instead of the table")


@dataclass(frozen=True)
class PublisherSettings(RedisSettings):
    """What ``demo/publish.py`` needs."""

    target_duration_s: float = setting(60.0, "TARGET_DURATION", "seconds to publish for", minimum=0)
    batch_size: int = setting(100, "BATCH_SIZE", "messages per burst", minimum=1)
    pause_min_ms: int = setting(100, "PAUSE_MIN_MS", "shortest pause between bursts", minimum=0)
    pause_max_ms: int = setting(500, "PAUSE_MAX_MS", "longest pause between bursts", minimum=0)
    rate: int = setting(
        0,
        "PUBLISH_RATE",
        "steady messages per second instead of random pauses; 0 = bursts",
        minimum=0,
    )
    retry_unreceived: bool = setting(
        False,
        "RETRY_UNRECEIVED",
        "re-publish messages that reached no subscriber",
    )
    record: str = setting(
        "",
        "PUBLISH_RECORD",
        "append a line 'message_id receivers' per PUBLISH to this file",
    )
    progress_interval_s: float = setting(
        5.0,
        "PROGRESS_INTERVAL",
        "seconds between progress lines",
        minimum=0.1,
    )


# Lua's unpack() returns at most about 8,000 values: the write script unpacks a batch's digests.
MAX_BATCH_SIZE = 5000

DAEMON_OPTIONS = options_of(Settings)
PUBLISHER_OPTIONS = options_of(PublisherSettings)


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
    detection_ms = settings.heartbeat_ttl_ms + 2 * settings.heartbeat_interval_ms
    if settings.takeover_buffer_ms <= detection_ms:
        raise ConfigError(
            f"invalid TAKEOVER_BUFFER_MS: {settings.takeover_buffer_ms} must exceed the time to "
            "detect a dead consumer "
            f"(HEARTBEAT_TTL_MS + 2 x HEARTBEAT_INTERVAL_MS = {detection_ms})"
        )
    if settings.lock_ttl_ms <= 2 * settings.takeover_buffer_ms:
        raise ConfigError(
            f"invalid LOCK_TTL_MS: {settings.lock_ttl_ms} must exceed twice TAKEOVER_BUFFER_MS "
            f"({settings.takeover_buffer_ms}) so a takeover never outlives the dedup window"
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
    )
