"""Settings of the daemon, the publisher and the tools, modelled once.

Every setting is one dataclass field, declared with :func:`~processor.options.setting`: its
default, environment variable, help and bounds in one place (the flag is the field's name).
:mod:`processor.loading` builds and checks them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Any

from processor.bounds import Bounds, parse_bounds
from processor.group.systemd import address_problem
from processor.options import options_of, setting
from processor.urls import MAX_PORT, host_problem, secret_free, url_problem

STRATEGIES = ("partitioned", "race")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
# The most consumer processes one daemon runs: far above what any host has cores for (each is a
# Python process with its own connections), low enough that a typo (CONSUMERS_COUNT=100000)
# cannot fork-bomb the host or exhaust Redis's clients.
MAX_CONSUMERS_PER_HOST = 256
WAIT_MODES = ("degrade", "strict")
SPREAD_MODES = ("auto", "always")


def _name_problem(name: str) -> str | None:
    return None if name.strip() else f"{name!r} is no name: a key or channel needs one"


def _name(default: str, env: str, help: str) -> Any:
    """A key or channel name. Redis takes an empty one, so an env file's ``OUTPUT_STREAM=``
    would send the daemon's writes to the key "" (or subscribe it to channel "")."""
    return setting(default, env, help, check=_name_problem)


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

    redis_host: str = setting("localhost", "REDIS_HOST", "Redis host", check=host_problem)
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
    input_channel: str = _name("messages:published", "INPUT_CHANNEL", "Pub/Sub channel to read")
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
    log_format: str = setting(
        "text", "LOG_FORMAT", "text, or json: one JSON object per line", choices=LOG_FORMATS
    )

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
        return secret_free(self.url)


@dataclass(frozen=True)
class GroupSettings(RedisSettings):
    """Where one group keeps its streams and bookkeeping: shared by the daemon and the tools."""

    output_stream: str = _name("messages:processed", "OUTPUT_STREAM", "output stream")
    dead_letter_stream: str = _name(
        "messages:dead", "DEAD_LETTER_STREAM", "stream for invalid messages (not OUTPUT_STREAM)"
    )
    consumers_list: str = _name("consumer:ids", "CONSUMERS_LIST", "Redis list of live consumer ids")
    key_prefix: str = _name("processor", "KEY_PREFIX", "prefix of the daemon's own keys")


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
        "", "HOST_ID", "this daemon's id among the group's hosts (default: the machine's host name)"
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
        50, "BATCH_WINDOW_MS", "a partial batch is flushed after this many ms", minimum=0
    )
    monitor_interval_s: float = setting(
        3.0, "MONITORING_INTERVAL", "seconds between throughput reports", minimum=0.1
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
        5.0, "HANDLER_TIMEOUT", "seconds a handler may run per message; 0 disables", minimum=0
    )
    handler_concurrency: int = setting(
        1, "HANDLER_CONCURRENCY", "handler calls in flight per consumer", minimum=1
    )
    handler_retries: int = setting(
        0,
        "HANDLER_RETRIES",
        "tries again of a message the handler raised on, before it is dead-lettered: after "
        "0.1 s, 0.2 s, doubling; the consumer's batch waits for them (3.1 s at most)",
        minimum=0,
        maximum=5,
    )
    strategy: str = setting(
        "partitioned", "STRATEGY", "which messages a consumer tries", choices=STRATEGIES
    )
    readers_per_host: int = setting(
        2,
        "READERS_PER_HOST",
        "consumers of a host that subscribe and feed the others their messages (partitioned; "
        "with race every consumer subscribes); two or more, so a reader's death loses nothing",
        minimum=1,
        maximum=MAX_CONSUMERS_PER_HOST,
    )
    spread: str = setting(
        "auto",
        "SPREAD",
        "whether a reader sends the consumers it feeds their messages: auto = once the handler "
        "takes half its time (with a cheaper handler it handles them itself, and they stand "
        "by); always",
        choices=SPREAD_MODES,
    )
    spread_hold_ms: int = setting(
        10_000,
        "SPREAD_HOLD_MS",
        "with SPREAD=auto, how long a reader keeps sending them their messages after handling "
        "them itself would last have taken a quarter of its time",
        minimum=0,
    )
    dedup_window_ms: int = setting(
        600_000,
        "DEDUP_WINDOW_MS",
        "dedup window: a message id is written once within it (remembered for between this and "
        "1.5 x this, by Redis's clock); LOCK_TTL_MS, its former name, is still read",
        minimum=1000,
        formerly="lock_ttl_ms",
    )
    max_message_bytes: int = setting(
        1_048_576, "MAX_MESSAGE_BYTES", "larger messages are dead-lettered", minimum=64
    )
    heartbeat_interval_ms: int = setting(
        500,
        "HEARTBEAT_INTERVAL_MS",
        "how often a consumer refreshes its heartbeat and reads the group",
        minimum=10,
    )
    heartbeat_ttl_ms: int = setting(
        2_000, "HEARTBEAT_TTL_MS", "a consumer silent this long is dead", minimum=50
    )
    takeover_buffer_ms: int = setting(
        10_000,
        "TAKEOVER_BUFFER_MS",
        "how long a consumer keeps messages it does not own (time Redis was away or refusing "
        "writes does not count; longer while another holds a message unwritten longer)",
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
        10.0, "SHUTDOWN_GRACE", "seconds consumers get to flush on shutdown", minimum=0.1
    )
    restart_backoff_max_s: float = setting(
        10.0,
        "RESTART_BACKOFF_MAX",
        "longest pause before a crashed consumer is replaced",
        minimum=0.1,
    )
    reconnect_backoff_max_s: float = setting(
        2.0, "RECONNECT_BACKOFF_MAX", "longest pause between reconnect attempts", minimum=0.01
    )
    startup_timeout_s: float = setting(
        0.0,
        "STARTUP_TIMEOUT",
        "seconds to wait for Redis at start, before any consumer starts; past it the daemon "
        "exits with code 4; 0 = wait forever",
        minimum=0,
    )
    notify_socket: str = setting(
        "",
        "NOTIFY_SOCKET",
        "systemd's notification socket, set by systemd for Type=notify: READY=1 once every "
        "local consumer is subscribed and registered, STOPPING=1 when a graceful stop starts; "
        "empty = not under systemd",
        check=address_problem,
    )

    @property
    def detection_ms(self) -> int:
        """How long a dead consumer can go unnoticed: its heartbeat's TTL and two intervals."""
        return self.heartbeat_ttl_ms + 2 * self.heartbeat_interval_ms

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
        False, "RETRY_UNRECEIVED", "re-publish messages that reached no subscriber"
    )
    record: str = setting(
        "", "PUBLISH_RECORD", "append a line 'message_id receivers' per PUBLISH to this file"
    )
    progress_interval_s: float = setting(
        5.0, "PROGRESS_INTERVAL", "seconds between progress lines", minimum=0.1
    )


# Lua's unpack() returns at most about 8,000 values: the write script unpacks a batch's digests.
MAX_BATCH_SIZE = 5000

DAEMON_OPTIONS = options_of(Settings)
PUBLISHER_OPTIONS = options_of(PublisherSettings)
