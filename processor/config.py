"""Settings of the daemon and the publisher, modelled once.

Every setting is declared once as an :class:`Option`; :func:`load` builds a frozen dataclass from
defaults < TOML file < environment < command-line flags and validates it. Nothing else in the
package reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from processor.errors import ConfigError

STRATEGIES = ("partitioned", "race")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Option:
    """One setting: its field name, environment variable, type, bounds and help text."""

    name: str
    env: str
    kind: type
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _redis_options() -> list[Option]:
    return [
        Option("redis_host", "REDIS_HOST", str, "Redis host"),
        Option("redis_port", "REDIS_PORT", int, "Redis port", minimum=1),
        Option(
            "redis_url",
            "REDIS_URL",
            str,
            "redis://, rediss:// (TLS) or unix:// URL with user/password; overrides host and port",
        ),
        Option("input_channel", "INPUT_CHANNEL", str, "Pub/Sub channel to read"),
        Option("loglevel", "LOGLEVEL", str, "log level", choices=LOG_LEVELS),
    ]


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


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis; shared by the daemon, the publisher and the tools."""

    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_url: str = field(default="", repr=False)
    input_channel: str = "messages:published"
    loglevel: str = "INFO"

    @property
    def url(self) -> str:
        return self.redis_url or f"redis://{self.redis_host}:{self.redis_port}/0"

    @property
    def safe_url(self) -> str:
        return _secret_free(self.url)


@dataclass(frozen=True)
class Settings(RedisSettings):
    """Everything one consumer daemon needs; picklable, so it crosses to the consumer processes."""

    consumers_count: int = 2
    processing_batch_size: int = 100
    batch_window_ms: int = 50
    output_stream: str = "messages:processed"
    dead_letter_stream: str = "messages:dead"
    consumers_list: str = "consumer:ids"
    monitor_interval_s: float = 3.0
    handler: str = "processor.handlers:add_random_score"
    handler_timeout_s: float = 5.0
    handler_concurrency: int = 1
    strategy: str = "partitioned"
    lock_ttl_ms: int = 600_000
    max_message_bytes: int = 1_048_576
    key_prefix: str = "processor"
    heartbeat_interval_ms: int = 500
    heartbeat_ttl_ms: int = 2_000
    takeover_buffer_ms: int = 10_000
    takeover_buffer_max: int = 500_000
    backlog_warn_bytes: int = 4 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    restart_backoff_max_s: float = 10.0
    reconnect_backoff_max_s: float = 2.0

    def describe(self) -> str:
        """One key=value line for the start-up log, password masked."""
        values = dataclasses.asdict(self)
        values["redis_url"] = self.safe_url
        values.pop("redis_host")
        values.pop("redis_port")
        return " ".join(f"{key}={value}" for key, value in values.items())


@dataclass(frozen=True)
class PublisherSettings(RedisSettings):
    """What ``demo/publish.py`` needs."""

    target_duration_s: float = 60.0
    batch_size: int = 100
    pause_min_ms: int = 100
    pause_max_ms: int = 500
    rate: int = 0
    retry_unreceived: bool = False
    record: str = ""
    progress_interval_s: float = 5.0


DAEMON_OPTIONS: list[Option] = [
    *_redis_options(),
    Option("consumers_count", "CONSUMERS_COUNT", int, "consumer processes", minimum=1),
    Option(
        "processing_batch_size",
        "PROCESSING_BATCH_SIZE",
        int,
        "messages written per batch at most",
        minimum=1,
    ),
    Option(
        "batch_window_ms",
        "BATCH_WINDOW_MS",
        int,
        "a partial batch is flushed after this many ms",
        minimum=0,
    ),
    Option("output_stream", "OUTPUT_STREAM", str, "output stream"),
    Option("dead_letter_stream", "DEAD_LETTER_STREAM", str, "stream for invalid messages"),
    Option("consumers_list", "CONSUMERS_LIST", str, "Redis list of live consumer ids"),
    Option(
        "monitor_interval_s",
        "MONITORING_INTERVAL",
        float,
        "seconds between throughput reports",
        minimum=0.1,
    ),
    Option("handler", "HANDLER", str, "message handler as package.module:function"),
    Option(
        "handler_timeout_s",
        "HANDLER_TIMEOUT",
        float,
        "seconds a handler may run per message; 0 disables",
        minimum=0,
    ),
    Option(
        "handler_concurrency",
        "HANDLER_CONCURRENCY",
        int,
        "handler calls in flight per consumer",
        minimum=1,
    ),
    Option("strategy", "STRATEGY", str, "which messages a consumer tries", choices=STRATEGIES),
    Option(
        "lock_ttl_ms",
        "LOCK_TTL_MS",
        int,
        "dedup window: a message id is written once within it",
        minimum=1000,
    ),
    Option(
        "max_message_bytes",
        "MAX_MESSAGE_BYTES",
        int,
        "larger messages are dead-lettered",
        minimum=64,
    ),
    Option("key_prefix", "KEY_PREFIX", str, "prefix of the daemon's own keys"),
    Option(
        "heartbeat_interval_ms",
        "HEARTBEAT_INTERVAL_MS",
        int,
        "how often a consumer refreshes its heartbeat and reads the group",
        minimum=10,
    ),
    Option(
        "heartbeat_ttl_ms",
        "HEARTBEAT_TTL_MS",
        int,
        "a consumer silent this long is dead",
        minimum=50,
    ),
    Option(
        "takeover_buffer_ms",
        "TAKEOVER_BUFFER_MS",
        int,
        "how long a consumer keeps messages it does not own",
        minimum=100,
    ),
    Option(
        "takeover_buffer_max",
        "TAKEOVER_BUFFER_MAX",
        int,
        "most messages a consumer keeps that it does not own",
        minimum=1,
    ),
    Option(
        "backlog_warn_bytes",
        "BACKLOG_WARN_BYTES",
        int,
        "warn when the server holds this many unread bytes for a consumer",
        minimum=1,
    ),
    Option(
        "shutdown_grace_s",
        "SHUTDOWN_GRACE",
        float,
        "seconds consumers get to flush on shutdown",
        minimum=0.1,
    ),
    Option(
        "restart_backoff_max_s",
        "RESTART_BACKOFF_MAX",
        float,
        "longest pause before a crashed consumer is replaced",
        minimum=0.1,
    ),
    Option(
        "reconnect_backoff_max_s",
        "RECONNECT_BACKOFF_MAX",
        float,
        "longest pause between reconnect attempts",
        minimum=0.01,
    ),
]

PUBLISHER_OPTIONS: list[Option] = [
    *_redis_options(),
    Option(
        "target_duration_s",
        "TARGET_DURATION",
        float,
        "seconds to publish for",
        minimum=0,
    ),
    Option("batch_size", "BATCH_SIZE", int, "messages per burst", minimum=1),
    Option("pause_min_ms", "PAUSE_MIN_MS", int, "shortest pause between bursts", minimum=0),
    Option("pause_max_ms", "PAUSE_MAX_MS", int, "longest pause between bursts", minimum=0),
    Option(
        "rate",
        "PUBLISH_RATE",
        int,
        "steady messages per second instead of random pauses; 0 = bursts",
        minimum=0,
    ),
    Option(
        "retry_unreceived",
        "RETRY_UNRECEIVED",
        bool,
        "re-publish messages that reached no subscriber",
    ),
    Option(
        "record",
        "PUBLISH_RECORD",
        str,
        "append a line 'message_id receivers' per PUBLISH to this file",
    ),
    Option(
        "progress_interval_s",
        "PROGRESS_INTERVAL",
        float,
        "seconds between progress lines",
        minimum=0.1,
    ),
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

SettingsT = TypeVar("SettingsT", bound=RedisSettings)


def _convert(option: Option, raw: object, source: str) -> object:
    where = f"{option.env} (from {source})"
    if option.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"invalid {where}: {raw!r} is not a boolean (true/false)")
    if option.kind is int:
        if isinstance(raw, (bool, float)):
            raise ConfigError(f"invalid {where}: {raw!r} is not an integer")
        try:
            value: object = int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"invalid {where}: {raw!r} is not an integer") from None
    elif option.kind is float:
        if isinstance(raw, bool):
            raise ConfigError(f"invalid {where}: {raw!r} is not a number")
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ConfigError(f"invalid {where}: {raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"invalid {where}: {raw!r} is not a finite number")
    else:
        if not isinstance(raw, str):
            raise ConfigError(f"invalid {where}: {raw!r} is not a string")
        value = raw.upper() if option.name == "loglevel" else raw
    if option.minimum is not None and value < option.minimum:  # type: ignore[operator]
        raise ConfigError(f"invalid {where}: {raw!r} must be >= {option.minimum:g}")
    if option.choices and value not in option.choices:
        raise ConfigError(f"invalid {where}: {raw!r} must be one of {', '.join(option.choices)}")
    return value


def read_toml(path: str, options: Sequence[Option]) -> dict[str, object]:
    """The settings in a TOML file, keyed by field name; unknown keys are an error."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    by_key = {option.name: option for option in options}
    by_key.update({option.env.lower(): option for option in options})
    values: dict[str, object] = {}
    for key, raw in document.items():
        option = by_key.get(key.lower())
        if option is None:
            raise ConfigError(f"unknown key {key!r} in config file {path}")
        values[option.name] = _convert(option, raw, f"config file {path}")
    return values


def build_parser(
    prog: str, description: str, options: Sequence[Option], defaults: Mapping[str, object]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of settings (keys as the flags, with _)"
    )
    for option in options:
        if option.kind is bool:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{option.help} [env {option.env}; default {defaults[option.name]!r}]",
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                default=None,
                metavar=option.env,
                help=f"{option.help} [env {option.env}; default {defaults[option.name]!r}]",
            )
    return parser


def load(
    cls: type[SettingsT],
    options: Sequence[Option],
    argv: Sequence[str],
    environ: Mapping[str, str],
    prog: str,
    description: str,
    extra_check: Callable[[SettingsT], None] | None = None,
) -> SettingsT:
    """Settings from defaults < file < environment < flags, validated; ConfigError otherwise."""
    defaults = {item.name: item.default for item in dataclasses.fields(cls)}
    parser = build_parser(prog, description, options, defaults)
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_toml(args.config, options))
    for option in options:
        if option.env in environ:
            values[option.name] = _convert(option, environ[option.env], "environment")
        flag_value = getattr(args, option.name)
        if flag_value is not None:
            values[option.name] = _convert(option, flag_value, f"flag {option.flag}")
    settings = cls(**values)
    if extra_check is not None:
        extra_check(settings)
    return settings


def check_daemon(settings: Settings) -> None:
    """Cross-field rules: the takeover buffer must outlive a dead consumer's detection."""
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
    if settings.pause_max_ms < settings.pause_min_ms:
        raise ConfigError(
            f"invalid PAUSE_MAX_MS: {settings.pause_max_ms} is below PAUSE_MIN_MS "
            f"({settings.pause_min_ms})"
        )


def load_daemon_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    return load(
        Settings,
        DAEMON_OPTIONS,
        argv,
        os.environ if environ is None else environ,
        prog="consume.py",
        description="Consume a Redis Pub/Sub channel into an exactly-once Redis Stream.",
        extra_check=check_daemon,
    )


def load_publisher_settings(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> PublisherSettings:
    return load(
        PublisherSettings,
        PUBLISHER_OPTIONS,
        argv,
        os.environ if environ is None else environ,
        prog="publish.py",
        description="Publish bursts of JSON messages to a Redis Pub/Sub channel.",
        extra_check=check_publisher,
    )
