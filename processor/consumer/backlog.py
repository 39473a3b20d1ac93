"""What Redis holds unsent for a subscription, and the limit past which it cuts one off.

Redis closes a subscriber whose unread output passes ``client-output-buffer-limit pubsub`` and
drops what it held: the heartbeat checks each subscription's ``omem`` every second and warns
from BACKLOG_WARN_BYTES on; at start the daemon warns when the server's limit is so low that
a reader would be cut off before that warning.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis
from redis.cluster import RedisCluster

log = logging.getLogger(__name__)


def server_backlog_bytes(
    client: redis.Redis, client_id: int, node: tuple[str, int] | None = None
) -> int:
    """What Redis holds unsent for one client (``omem`` in CLIENT LIST); on a cluster, for a
    client of ``node``, asked through the cluster client."""
    if node is None:
        info = client.execute_command("CLIENT", "LIST", "ID", client_id)  # type: ignore[no-untyped-call]
    else:
        cluster = cast(RedisCluster, client)
        target = cluster.get_node(host=node[0], port=node[1])  # type: ignore[no-untyped-call]
        if target is None:
            return 0  # a node the cluster client has not learnt yet: ask again next time
        info = cluster.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "LIST", "ID", client_id, target_nodes=target
        )
    text = info.decode() if isinstance(info, bytes) else str(info)
    for item in text.split():
        name, _, value = item.partition("=")
        if name == "omem":
            return int(value)
    return 0


def pubsub_limits(client: redis.Redis) -> tuple[int, int, int] | None:
    """The server's ``client-output-buffer-limit`` for Pub/Sub clients: (hard bytes, soft
    bytes, soft seconds), 0 for no limit; None where CONFIG is not allowed (a managed Redis,
    an ACL user without it)."""
    try:
        reply: dict[Any, Any] = client.config_get("client-output-buffer-limit")
    except (redis.exceptions.NoPermissionError, redis.ResponseError) as error:
        log.debug("CONFIG GET not allowed: the Pub/Sub output limit not checked (%s)", error)
        return None
    value = reply.get("client-output-buffer-limit") or reply.get(b"client-output-buffer-limit")
    words = (value.decode() if isinstance(value, bytes) else str(value or "")).split()
    for at in range(0, len(words) - 3, 4):
        if words[at] == "pubsub":
            hard, soft, seconds = (int(word) for word in words[at + 1 : at + 4])
            return hard, soft, seconds
    return None


def warn_if_cut_off_unwarned(client: redis.Redis, warn_bytes: int) -> None:
    """Warns when Redis would cut a reader off at or below BACKLOG_WARN_BYTES: the reader
    would lose what Redis held for it (reported as a gap) without a warning first."""
    limits = pubsub_limits(client)
    if limits is None:
        return
    hard, soft, seconds = limits
    lowest = min(limit for limit in (hard, soft) if limit) if hard or soft else 0
    if lowest and lowest <= warn_bytes:
        log.warning(
            "Redis cuts a subscriber off at client-output-buffer-limit pubsub %s (hard), %s for "
            "%d s (soft): at or below BACKLOG_WARN_BYTES (%s), so a reader that falls behind is "
            "cut off before it is warned, and what Redis held for it is lost (reported as a "
            "gap); raise the limit (CONFIG SET client-output-buffer-limit "
            "'pubsub 32mb 8mb 60', the default) or lower BACKLOG_WARN_BYTES",
            _size(hard),
            _size(soft),
            seconds,
            _size(warn_bytes),
        )


def _size(size: int) -> str:
    if not size:
        return "none"
    if size >= 2**20:
        return f"{size / 2**20:g} MiB"
    return f"{size / 2**10:g} KiB"
