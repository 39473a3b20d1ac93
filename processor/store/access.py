"""The start-up check that Redis lets the daemon in and lets it do everything it needs.

A wrong password or a missing ACL permission is a configuration error: caught here, before any
consumer starts, it becomes one line naming the setting and the cause, instead of consumers that
retry forever or die on their first write. The commands are checked without running them: each
is queued inside MULTI, where Redis checks the command, its keys and its channel against the
user's ACL, and the transaction is then discarded.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import redis

from processor.config import Settings
from processor.errors import ConfigError, RetryGaveUp, RetryStopped, StartupTimeout
from processor.store.connection import (
    CONNECTION_ERRORS,
    REFUSALS,
    command_client,
    refused_credentials,
    refused_database,
)
from processor.store.keys import Keys
from processor.store.outage import Backoff, Outage, Retrier
from processor.store.version import check_server_version

log = logging.getLogger(__name__)

T = TypeVar("T")

_PROBE = "access-check"

# The least a Redis user needs to run the daemon and ``processor status`` with the default key
# names (the README shows it as an ACL SETUSER line; tests/test_access.py runs the daemon as it).
ACL_RULES = (
    "resetkeys resetchannels -@all "
    "~messages:processed ~messages:dead ~consumer:ids ~processor:* &messages:published "
    "+ping +client|setname +client|id +client|list +subscribe +unsubscribe "
    "+evalsha +script|load +multi +exec +discard "
    "+get +set +del +unlink +pexpire +pexpireat +time +info "
    "+lrange +lrem +rpush +hset +hsetnx +hget +hexists +hdel +hincrby +hmget +hgetall "
    "+sadd +smismember +zadd +zrange +zrangebyscore +zrem +zscore "
    "+xadd +xread +xlen +xrevrange +type"
)

# The same on Redis Cluster, set on every node (ACLs are per node): the tagged key names, the
# sharded channel commands, ROLE and CLUSTER SLOTS for the readers, COMMAND for redis-py's
# cluster client, WAIT for WAIT_REPLICAS, ZCOUNT for the PARTITIONS check, and SPUBLISH for
# `processor publish` (tests/test_cluster_parts.py runs the daemon, the publisher and status as
# this user).
CLUSTER_ACL_RULES = (
    "resetkeys resetchannels -@all "
    "~messages:processed:* ~messages:dead:* ~consumer:ids:* ~processor:* ~{processor}:* "
    "&messages:published:* "
    "+ping +client|setname +client|id +client|list +ssubscribe +sunsubscribe +spublish +role "
    "+cluster|slots +command +evalsha +script|load +multi +exec +discard +wait "
    "+get +set +del +unlink +pexpire +pexpireat +time +info "
    "+lrange +lrem +rpush +llen +hset +hsetnx +hget +hexists +hdel +hincrby +hmget +hgetall "
    "+sadd +smismember +zadd +zrange +zrangebyscore +zrem +zscore +zcount "
    "+xadd +xread +xlen +xrevrange +type"
)


def required_commands(keys: Keys) -> list[tuple[str, ...]]:
    """Every command the daemon sends, on the keys and channel it sends them to."""
    heartbeat = keys.heartbeat(_PROBE)
    seen = keys.seen_prefix + "0"
    return [
        ("SUBSCRIBE", keys.channel),
        ("CLIENT", "ID"),
        ("CLIENT", "SETNAME", "processor"),
        ("CLIENT", "LIST", "ID", "1"),
        ("SCRIPT", "LOAD", "return 1"),
        ("EVALSHA", "0" * 40, "0"),
        # Membership and leaving (heartbeat and list; also inside membership.lua, leave.lua).
        ("SET", heartbeat, "1", "PX", "1000"),
        ("PEXPIRE", heartbeat, "1000"),
        ("HSET", keys.info(_PROBE), "beat_ms", "0"),
        ("PEXPIRE", keys.info(_PROBE), "1000"),
        ("GET", heartbeat),
        ("DEL", heartbeat),
        ("LRANGE", keys.consumers, "0", "-1"),
        ("LREM", keys.consumers, "0", _PROBE),
        ("RPUSH", keys.consumers, _PROBE),
        ("XADD", keys.departures, "MAXLEN", "~", "1000", "*", "consumer_id", _PROBE),
        ("XADD", keys.gaps, "MAXLEN", "~", "1000", "*", "consumer_id", _PROBE),
        ("XREAD", "COUNT", "1", "STREAMS", keys.gaps, keys.departures, "0", "0"),
        # The exactly-once write (inside dedup_append.lua, seen.lua).
        ("TIME",),
        ("GET", keys.single.seen_clock),
        ("SET", keys.single.seen_clock, "1"),
        ("SMISMEMBER", seen, "x"),
        ("SADD", seen, "x"),
        ("PEXPIREAT", seen, "1"),
        ("UNLINK", seen),
        ("XADD", keys.output, "*", "message_id", _PROBE),
        ("XADD", keys.dead, "*", "reason", _PROBE),
        ("HINCRBY", keys.stats, "written", "0"),
        ("TYPE", keys.output),  # the write script's check, and the start-up check of every key
        # The control plane (inside host_beat.lua; autoscale; processor status, scale, stop).
        ("ZRANGEBYSCORE", keys.hosts, "-inf", "0"),
        ("ZREM", keys.hosts, _PROBE),
        ("ZSCORE", keys.hosts, _PROBE),
        ("ZADD", keys.hosts, "0", _PROBE),
        ("ZRANGE", keys.hosts, "0", "-1"),
        ("HGET", keys.host_info, _PROBE),
        ("HSET", keys.host_info, _PROBE, "{}"),
        ("HDEL", keys.host_info, _PROBE),
        ("HGETALL", keys.control),
        ("HSET", keys.control, "desired", "1"),
        ("HSETNX", keys.control, "desired", "1"),
        ("HEXISTS", keys.control, "cleared_by"),  # set_desired.lua (processor scale)
        ("GET", keys.stop),
        ("SET", keys.autoscale_lock, _PROBE, "NX", "PX", "1000"),
        ("HMGET", keys.info(_PROBE), "busy", "inbox"),
        # The monitor.
        ("HMGET", keys.stats, "written", "dead"),
        # processor status.
        ("HGETALL", keys.info(_PROBE)),
        ("XLEN", keys.output),
        ("XREVRANGE", keys.dead, "+", "-", "COUNT", "1"),
    ]


def check_access(settings: Settings, stop: threading.Event, deadline: float | None = None) -> None:
    """Returns once Redis accepts our credentials and every command; raises ConfigError if not.

    A Redis that is not reachable yet is waited for (logged as an Outage), until ``stop`` is set
    or past ``deadline`` (monotonic; see :func:`startup_deadline`), which raises StartupTimeout.
    """
    if stop.is_set():
        return
    keys = Keys.from_settings(settings)
    outage = Outage("Redis (start-up check)", url=settings.url)
    retrier = Retrier(outage, Backoff(0.1, settings.reconnect_backoff_max_s), stop)
    try:
        refusals = retry_at_start(settings, retrier, lambda: _attempt(settings, keys), deadline)
    except RetryStopped:
        return
    if any(reason.startswith("MOVED") for reason in refusals):
        raise ConfigError(
            f"invalid REDIS_CLUSTER: {settings.safe_url} is a Redis Cluster node (it answers "
            "MOVED for our keys); set REDIS_CLUSTER=true"
        )
    if refusals:
        raise ConfigError(
            f"Redis at {settings.safe_url} refuses what the daemon needs: "
            + "; ".join(f"{', '.join(what)} ({reason})" for reason, what in refusals.items())
            + ": grant these to the Redis user (see the README's ACL line)"
        )


def startup_deadline(settings: Settings) -> float | None:
    """When the daemon gives up waiting for Redis (monotonic); None to wait forever."""
    if not settings.startup_timeout_s:
        return None
    return time.monotonic() + settings.startup_timeout_s


def retry_at_start(
    settings: Settings, retrier: Retrier, do: Callable[[], T], deadline: float | None
) -> T:
    """``retrier.call(do)`` at start-up, never waiting past ``deadline``: the last attempt is
    made at it. Raises StartupTimeout once an attempt failed past it."""
    try:
        return retrier.call(do, deadline)
    except RetryGaveUp:
        assert deadline is not None
        waited = time.monotonic() - (deadline - settings.startup_timeout_s)
        raise StartupTimeout(
            f"Redis at {settings.safe_url} not reachable within STARTUP_TIMEOUT "
            f"({settings.startup_timeout_s:g} s; waited {waited:.1f} s): "
            f"{retrier.outage.describe()}"
        ) from None


def _attempt(settings: Settings, keys: Keys) -> dict[str, list[str]]:
    """One probe (see :func:`_probe`); what no retry can mend is raised as a ConfigError."""
    try:
        return _probe(settings, keys)
    except CONNECTION_ERRORS as error:
        problem = _configuration_problem(settings, error)
        if problem is not None:
            raise problem from None
        raise


def _configuration_problem(settings: Settings, error: BaseException) -> ConfigError | None:
    """What no retry can mend: refused credentials, a failed TLS handshake, REDIS_CLUSTER set
    for a node that is not in a cluster. The cluster client wraps what its nodes answered, so
    the cause is looked at too."""
    refused = refused_credentials(error)
    if refused is not None:
        return ConfigError(
            f"Redis refused the credentials in REDIS_URL ({settings.safe_url}): {refused}"
        )
    if _tls_refused(error):
        return ConfigError(
            f"TLS with {settings.safe_url} failed: {error} (check REDIS_URL and "
            "REDIS_TLS_CA_FILE, REDIS_TLS_CERT_FILE, REDIS_TLS_KEY_FILE)"
        )
    if isinstance(error, redis.exceptions.ReadOnlyError):
        return ConfigError(
            f"Redis at {settings.safe_url} is a read-only replica (READONLY): point REDIS_URL "
            "at the primary"
        )
    if isinstance(error, redis.exceptions.RedisClusterException) and "not enabled" in str(error):
        return ConfigError(
            f"invalid REDIS_CLUSTER: {settings.safe_url} is not a Redis Cluster node (cluster "
            "mode is not enabled there); unset REDIS_CLUSTER for a single Redis"
        )
    return None


def _probe(settings: Settings, keys: Keys) -> dict[str, list[str]]:
    """What Redis refuses of the daemon's commands; raises if it cannot be reached.

    The server's version is checked first: an old server's unknown commands are no ACL's
    doing. On a cluster only that and the credentials are checked (a PING through the cluster
    client, which reads the layout from the nodes): MULTI cannot span the slots of every key
    we use.
    """
    # No inner retries: the caller's loop retries, and logs the first failure without waiting
    # out two more (a TLS handshake that gets no answer takes SOCKET_TIMEOUT_S each).
    client = command_client(settings, name="processor-access-check", retries=0)
    try:
        with refused_database(settings):
            if keys.cluster:
                client.ping()
            check_server_version(client, settings.safe_url)
            return {} if keys.cluster else _dry_run(client, keys)
    finally:
        client.close()


def _tls_refused(error: BaseException) -> bool:
    """A failed handshake (unknown CA, missing or rejected client certificate) is not a blip."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _dry_run(client: redis.Redis, keys: Keys) -> dict[str, list[str]]:
    """Queues every required command in MULTI and discards it; returns what Redis refused,
    grouped by its reason.

    Redis refuses a write it would refuse to run (a full Redis, a replica, ...) when it is
    queued: that is raised, not returned, as the state of the server, not of our permissions.
    """
    connection: Any = client.connection_pool.get_connection()
    refusals: dict[str, list[str]] = {}
    refused: redis.RedisError | None = None
    try:
        connection.send_command("MULTI")
        connection.read_response()
        for command in required_commands(keys):
            connection.send_command(*command)
            try:
                connection.read_response()
            except REFUSALS as error:
                refused = refused or error
            except redis.ResponseError as error:
                # redis-py keeps only "<slot> <node>" of a MOVED reply as the message.
                moved = isinstance(error, redis.exceptions.MovedError)
                reason = f"MOVED {error}" if moved else str(error)
                refusals.setdefault(reason, []).append(_describe(command, keys))
        connection.send_command("DISCARD")
        connection.read_response()
    except BaseException:
        connection.disconnect()
        raise
    finally:
        client.connection_pool.release(connection)
    if refused is not None:
        raise refused
    return refusals


def _describe(command: tuple[str, ...], keys: Keys) -> str:
    name = " ".join(command[:2]) if command[0] in ("CLIENT", "SCRIPT") else command[0]
    if command[0] == "SUBSCRIBE":
        return f"SUBSCRIBE to INPUT_CHANNEL {keys.channel!r}"
    targets = [arg for arg in command[1:] if arg.startswith(_key_prefixes(keys))]
    return f"{name} on {targets[0]!r}" if targets else name


def _key_prefixes(keys: Keys) -> tuple[str, ...]:
    """Every key name and key prefix the daemon uses (all of Keys but the channel)."""
    names = [value for value in asdict(keys).values() if isinstance(value, str)]
    for partition in keys.partitions:
        names += [value for name, value in asdict(partition).items() if name != "channel"]
    return tuple(name for name in names if name)
