"""The start-up check of the server's name and version: a server older than the commands the
daemon sends is refused with one line, before its first unknown command could be misread as a
missing ACL permission."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import redis
from redis.cluster import RedisCluster

from processor.errors import ConfigError

log = logging.getLogger(__name__)

# SMISMEMBER (the dedup window's seen check) and CLIENT LIST ID (the readers' connection check)
# came with Redis 6.2. Valkey forked from Redis 7.2: every Valkey release has both.
OLDEST = {"Redis": (6, 2, 0), "Valkey": (7, 2, 0)}
NEEDED_BY = "SMISMEMBER and CLIENT LIST ID"
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def server_of(info: Mapping[str, Any]) -> tuple[str, str]:
    """(name, version) from INFO server. Valkey also reports ``redis_version`` (always 7.2.4,
    the Redis it forked from); its own is ``valkey_version``."""
    if "valkey_version" in info:
        return "Valkey", str(info["valkey_version"])
    return "Redis", str(info.get("redis_version", ""))


def unsupported(info: Mapping[str, Any]) -> str | None:
    """Why the daemon cannot run on the server that answered ``info``, or None if it can.

    A version that does not parse is let through (a server we do not know may still speak
    Redis's protocol): what it lacks shows in the access check's refusals."""
    name, version = server_of(info)
    parsed = _VERSION.match(version)
    if parsed is None:
        log.warning("could not tell the version of %s from INFO: %r", name, version)
        return None
    oldest = OLDEST[name]
    if tuple(int(part or 0) for part in parsed.groups()) >= oldest:
        return None
    wanted = ".".join(str(part) for part in oldest[:2])
    return f"{name} {version}, older than {wanted}, the oldest it runs on (it sends {NEEDED_BY})"


def check_server_version(client: redis.Redis | RedisCluster, safe_url: str) -> None:
    """Logs the server's name and version; raises ConfigError if the daemon cannot run on it.

    On a cluster every node is checked: a rolling upgrade leaves old and new side by side."""
    try:
        if isinstance(client, RedisCluster):
            # redis-py's cluster client answers by node, unless one node answered.
            answer = client.info("server", target_nodes=RedisCluster.ALL_NODES)
            infos = [answer] if "redis_version" in answer else list(answer.values())
        else:
            infos = [client.info("server")]
    except redis.exceptions.NoPermissionError as error:
        # The access check that follows names INFO among what the user lacks.
        log.warning("could not read the version of Redis at %s: %s", safe_url, error)
        return
    for info in infos:
        problem = unsupported(info)
        if problem is not None:
            raise ConfigError(f"Redis at {safe_url} is {problem}: upgrade the server")
    servers = sorted({" ".join(server_of(info)) for info in infos})
    log.info("Redis at %s is %s", safe_url, ", ".join(servers))
