"""Redis clients built from the settings, and the one back-off every reconnect uses."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import redis
from redis._parsers.base import BaseParser
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from processor.config import RedisSettings, database
from processor.errors import ConfigError, WritesRefused, WrongType

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
# script (call to f_<sha>): @user_script:107: @user_script: 107: -OOM command not allowed ...".
_ERROR_IN_SCRIPT = re.compile(r"^Error running script .*?: -([A-Z]+ .*)", re.DOTALL)


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
        return cast(redis.Redis, RedisCluster.from_url(settings.url, **options))
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


def refused_credentials(error: BaseException) -> redis.AuthenticationError | None:
    """The refusal of our credentials in ``error``, also where the cluster client wrapped what
    a node answered in its own exception."""
    for candidate in (error, error.__cause__):
        if isinstance(candidate, redis.AuthenticationError):
            return candidate
    return None


class Backoff:
    """Capped exponential back-off with full jitter, reset by the caller after a success."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self._base_s = base_s
        self._cap_s = cap_s
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._cap_s, self._base_s * 2**self._failures)
        self._failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0


def _ignore(what: str) -> None:
    pass


# Told of every outage that ended, by what it was about; the consumer points it at its metrics.
on_outage_recovered: Callable[[str], None] = _ignore


class Downtime:
    """How long, in this process, some Outage has been on (Redis unreachable or refusing us).

    The takeover buffer ages only outside it: while writes fail here they fail for the owners
    too, so a message received then may still be unwritten, however old.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: set[int] = set()
        self._since = 0.0
        self._total_s = 0.0

    def begin(self, outage: object, now: float) -> None:
        with self._lock:
            if not self._active:
                self._since = now
            self._active.add(id(outage))

    def end(self, outage: object, now: float) -> None:
        with self._lock:
            if id(outage) not in self._active:
                return
            self._active.discard(id(outage))
            if not self._active:
                self._total_s += now - self._since

    def total_s(self, now: float) -> float:
        with self._lock:
            return self._total_s + (now - self._since if self._active else 0.0)


DOWNTIME = Downtime()


# While an outage lasts, a line this often (seconds): an operator watching the log sees that
# we still wait, for what and why, without a line per retry. A variable, so tests shorten it.
OUTAGE_REPEAT_S = 30.0

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


class Outage:
    """Logs an outage when it starts, every OUTAGE_REPEAT_S while it lasts, and when it ends.

    ``detail`` adds what the caller holds meanwhile (for example "holding 120 messages") to the
    start and repeat lines; ``url`` lets them name a TLS mismatch (see :func:`explain`).
    """

    def __init__(
        self,
        what: str,
        context: Callable[[], str] = lambda: "",
        detail: Callable[[], str] | None = None,
        url: str = "",
    ) -> None:
        self._what = what
        self._context = context
        self._detail = detail
        self._url = url
        self._started: float | None = None
        self._logged_at = 0.0
        self._attempts = 0
        self.error: BaseException | None = None

    @property
    def active(self) -> bool:
        return self._started is not None

    def length_s(self) -> float:
        """How long the outage on has lasted so far (0 when none is on)."""
        return 0.0 if self._started is None else time.monotonic() - self._started

    def describe(self) -> str:
        """How many attempts failed and the last error: for a caller that gives up waiting."""
        error = "" if self.error is None else explain(self.error, self._url)
        plural = "" if self._attempts == 1 else "s"
        return f"{self._attempts} failed attempt{plural}; the last: {error}"

    def failed(self, error: BaseException) -> None:
        self._attempts += 1
        self.error = error
        now = time.monotonic()
        starting = self._started is None
        if self._started is None:
            self._started = now
            DOWNTIME.begin(self, now)
        if refused_credentials(error) is not None:
            # Not a blip: a rotated password needs an operator, so say it on every attempt.
            log.error(
                "%s %s refused our credentials (attempt %d): %s; fix REDIS_URL's password "
                "and restart, or restore the old one; retrying%s",
                self._context(),
                self._what,
                self._attempts,
                str(error).rstrip("."),
                self._details(),
            )
            return
        if starting:
            self._log_start(error)
        elif now - self._logged_at >= OUTAGE_REPEAT_S:
            self._log_repeat(error, now - self._started)
        else:
            return
        self._logged_at = now

    def _details(self) -> str:
        text = self._detail() if self._detail is not None else ""
        return f"; {text}" if text else ""

    def _log_start(self, error: BaseException) -> None:
        if isinstance(error, REFUSALS):
            mended = (
                "that key is deleted or renamed"
                if isinstance(error, WrongType)
                else "Redis takes writes again"
            )
            log.error(
                "%s %s refused: %s %s; retrying until %s%s",
                self._context(),
                self._what,
                error.status_code,
                str(error).rstrip("."),
                mended,
                self._details(),
            )
        else:
            log.warning(
                "%s %s unavailable: %s; retrying%s",
                self._context(),
                self._what,
                explain(error, self._url),
                self._details(),
            )

    def _log_repeat(self, error: BaseException, length_s: float) -> None:
        if isinstance(error, REFUSALS):
            log.error(
                "%s %s still refused after %.0f s (%d failed attempts): %s %s; retrying%s",
                self._context(),
                self._what,
                length_s,
                self._attempts,
                error.status_code,
                str(error).rstrip("."),
                self._details(),
            )
        else:
            log.warning(
                "%s %s still unavailable after %.0f s (%d failed attempts): %s; retrying%s",
                self._context(),
                self._what,
                length_s,
                self._attempts,
                explain(error, self._url),
                self._details(),
            )

    def recovered(self) -> float:
        """Ends the outage, if any; returns its length in seconds."""
        if self._started is None:
            return 0.0
        now = time.monotonic()
        DOWNTIME.end(self, now)
        length = now - self._started
        log.warning(
            "%s %s back after %.2f s (%d failed attempts)",
            self._context(),
            self._what,
            length,
            self._attempts,
        )
        self._started = None
        self._attempts = 0
        self.error = None
        on_outage_recovered(self._what)
        return length
