"""Redis clients built from the settings, and the errors our loops retry."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any, cast

import redis
from redis._parsers.base import BaseParser
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from processor.config import RedisSettings
from processor.errors import ConfigError, WritesRefused, WrongType
from processor.urls import database

log = logging.getLogger(__name__)

# Short inner retries: they hide a blip (a dropped idle connection) from the caller. Longer
# outages surface as ConnectionError to our own loops, which log them once and keep trying.
_INNER_RETRIES = 2
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


# redis-py raises the class registered for an error reply's first word (OOM, READONLY and
# LOADING have theirs); these would be plain ResponseErrors, which end the thread that gets one:
# a consumer would leave with what it holds, and a whole group at once.
for _code in ("MISCONF", "NOREPLICAS", "BUSY"):
    BaseParser.EXCEPTION_CLASSES.setdefault(_code, WritesRefused)
BaseParser.EXCEPTION_CLASSES.setdefault("WRONGTYPE", WrongType)

# Redis refusing what we send until an operator or time mends it. Retried like a dropped
# connection, holding what is not written: nothing is refused halfway (a script is refused
# only before its first write), and every consumer of a group gets the same refusal.
REFUSALS: tuple[type[redis.RedisError], ...] = (
    redis.exceptions.OutOfMemoryError,  # maxmemory reached (with noeviction)
    redis.exceptions.ReadOnlyError,  # a replica: the URL points at a demoted primary
    WritesRefused,
    WrongType,
)

# What redis-py's Retry reconnects on by default.
_RECONNECT_ON = (redis.ConnectionError, redis.TimeoutError, socket.timeout)

# Redis before 7 reports a command refused inside a script as the script's error: "Error running
# script (call to f_<sha>): @user_script:107: @user_script: 107: -OOM command not allowed ...",
# and with no dash where the command itself refused: "...: @user_script:51: WRONGTYPE ...".
_ERROR_IN_SCRIPT = re.compile(r"^Error running script .*?: -?([A-Z]+ .*)", re.DOTALL)


@contextlib.contextmanager
def script_refusals() -> Iterator[None]:
    """Raises a refusal inside a Redis 6 script error as Redis 7 replies it (parsed as redis-py
    parses a reply), so that our loops wait it out alike (a plain ResponseError ends the thread
    that gets it)."""
    try:
        yield
    except redis.ResponseError as error:
        found = _ERROR_IN_SCRIPT.match(str(error))
        inner = BaseParser.parse_error(found.group(1)) if found else None  # type: ignore[no-untyped-call]
        if not isinstance(inner, REFUSALS):
            raise
        raise inner from error


CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    *REFUSALS,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
    # A cluster in a failover or a layout change: the slot's primary is down, moved, or not
    # known yet. Retried like a dropped connection, after the layout is read again.
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
)

# Whatever a caller that must carry on (a report, a beat, a clean-up) can get from Redis or the
# network: the cluster client's own exception is not a RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.RedisError,
    OSError,
    redis.exceptions.RedisClusterException,
)


class _Cluster(RedisCluster):
    """redis-py's cluster client, that stops asking a dead node for a command's keys.

    For a command whose keys it cannot find by itself (XREAD, which the heartbeat and the
    monitor read the group's streams with), redis-py asks its default node (``COMMAND
    GETKEYS``), the primary of the first slots, before routing. A failover of that primary only
    replaces the default node in errors of the routed command, which never runs: every such
    command would fail for good, and the heartbeats with it. We ask the next primary instead.
    """

    def _get_command_keys(self, *args: Any) -> Any:
        for _ in range(len(self.get_primaries())):  # type: ignore[no-untyped-call]
            try:
                return super()._get_command_keys(*args)  # type: ignore[no-untyped-call]
            except _RECONNECT_ON:
                self.replace_default_node()
        return super()._get_command_keys(*args)  # type: ignore[no-untyped-call]


def command_client(
    settings: RedisSettings,
    name: str = "processor",
    timeout_s: float = SOCKET_TIMEOUT_S,
    retries: int = _INNER_RETRIES,
) -> redis.Redis:
    """A client for commands and scripts, with bytes replies (payloads are not always UTF-8).

    ``timeout_s`` bounds each read and each connect; ``retries`` are the inner retries of a
    command whose connection failed (0 for a caller that must never wait long).

    With REDIS_CLUSTER, redis-py's cluster client, which routes each command to its slot's
    primary and re-reads the layout after a failover. It is not a ``redis.Redis`` but offers the
    same commands, scripts and pipelines for the keys we give it (one slot per call).
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": min(timeout_s, CONNECT_TIMEOUT_S),
        "retry": Retry(
            ExponentialWithJitterBackoff(cap=0.5, base=0.05),
            retries,
            # READONLY: the node was demoted. The retry's new connection may reach the new
            # primary (a DNS name or address that moved); the old one never would.
            supported_errors=(*_RECONNECT_ON, redis.exceptions.ReadOnlyError),
        ),
        "client_name": name,
        "protocol": 2,
        **settings.tls_options,
    }
    if settings.redis_cluster:
        return cast(redis.Redis, _Cluster.from_url(settings.url, **options))
    return redis.Redis.from_url(settings.url, **options)


def reread_layout(client: redis.Redis) -> None:
    """Makes a cluster client read the layout again (after an error, or a message that reached
    no subscriber: a failover may have moved a slot without the client hearing of it)."""
    try:
        cast(RedisCluster, client).nodes_manager.initialize()
    except CONNECTION_ERRORS as error:
        log.debug("cluster layout not read: %s", error)


@contextlib.contextmanager
def refused_database(settings: RedisSettings) -> Iterator[None]:
    """Raises Redis's refusal of the database REDIS_URL selects (it has fewer, per its
    ``databases`` setting) as the ConfigError it is: no retry mends it. Known only once a
    connection sends its SELECT, so the commands' first connection is wrapped in this."""
    try:
        yield
    except redis.ResponseError as error:
        if not str(error).startswith("DB index is out of range"):
            raise
        raise ConfigError(
            f"invalid REDIS_URL: Redis at {settings.safe_url} has no database "
            f"{database(settings.url)} ({error}; see its 'databases' setting)"
        ) from None


@contextlib.contextmanager
def command_session(settings: RedisSettings, name: str, timeout_s: float) -> Iterator[redis.Redis]:
    """A command's client for one ``with`` block, closed after; a database REDIS_URL selects and
    Redis lacks is raised as the ConfigError it is (``refused_database``). Making the client may
    raise a connection error already: a cluster client reads the layout as it is made."""
    client = command_client(settings, name=name, timeout_s=timeout_s)
    try:
        with refused_database(settings):
            yield client
    finally:
        client.close()


def refused_credentials(error: BaseException) -> redis.AuthenticationError | None:
    """The refusal of our credentials in ``error``, also where the cluster client wrapped what
    a node answered in its own exception."""
    for candidate in (error, error.__cause__):
        if isinstance(candidate, redis.AuthenticationError):
            return candidate
    return None


_TLS_ONLY = "probably a TLS mismatch: the URL is redis:// but the server speaks only TLS"
_NOT_TLS = "probably a TLS mismatch: the URL is rediss:// but the server does not speak TLS"


def explain(error: BaseException, url: str = "") -> str:
    """The error as our lines show it, naming a TLS mismatch with the server at ``url``.

    Neither side says so: a rediss:// client's handshake waits for an answer a plaintext Redis
    never sends (a timeout), and a TLS-only Redis drops a redis:// client that talks RESP to it
    (a reset, or a close, before the first reply).
    """
    text = str(error).rstrip(".")
    causes = list(_chain(error))
    if url.startswith("rediss://") and any("handshake" in str(seen) for seen in causes):
        return f"{text}; {_NOT_TLS}"
    dropped = any(
        isinstance(seen, (ConnectionResetError, BrokenPipeError))
        or "Connection closed by server" in str(seen)
        for seen in causes
    )
    if url.startswith("redis://") and dropped:
        return f"{text}; {_TLS_ONLY}"
    return text


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__
