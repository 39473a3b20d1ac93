"""One script call packed in C, and the WAIT for its replicas on the same connection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis

from processor.store.connection import script_refusals

# How long a write waits for WAIT_REPLICAS replicas.
WAIT_TIMEOUT_MS = 1000


def evalsha_packed(
    client: redis.Redis,
    sha: str,
    source: str,
    keys: list[str],
    args: Sequence[Any],
    wait_replicas: int = 0,
    wait_timeout_ms: int = WAIT_TIMEOUT_MS,
    hold: Callable[[list[Any], int], int | None] | None = None,
) -> list[Any]:
    """EVALSHA packed by hiredis in one call; loads ``source`` once if Redis lost it (a
    restart, a flush, or a replica promoted by a failover: the script cache is not replicated).
    With ``wait_replicas``, then WAITs on the same connection for that many replicas to have
    the write (``wait_timeout_ms`` at most) and appends how many did to the reply. After a
    WAIT that fell short, ``hold`` (given the reply and that count) returns the timeout of
    another WAIT, or None to return the shortfall. Only this connection's WAIT confirms the
    write: on another, WAIT counts from that connection's own last write.

    redis-py's Script packs the 400 arguments of a batch one by one in Python (about 2 µs
    per message); hiredis.pack_command packs the tuple in C.
    """
    command = ("EVALSHA", sha, len(keys), *keys, *args)
    packed = hiredis.pack_command(command)
    pool = client.connection_pool
    connection: Any = pool.get_connection()
    try:
        send = connection.send_packed_command
        send([packed], check_health=False)
        with script_refusals():
            try:
                reply: list[Any] = connection.read_response()
            except redis.exceptions.NoScriptError:
                # A restarted or flushed Redis lost the script: load it, then call it again.
                connection.send_command("SCRIPT", "LOAD", source)
                connection.read_response()
                send([packed], check_health=False)
                reply = connection.read_response()
        if wait_replicas:
            confirmed = _wait(connection, wait_replicas, wait_timeout_ms)
            while confirmed < wait_replicas and hold is not None:
                timeout_ms = hold(reply, confirmed)
                if timeout_ms is None:
                    break
                confirmed = _wait(connection, wait_replicas, timeout_ms)
            reply = [*reply, confirmed]
        return reply
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _wait(connection: Any, replicas: int, timeout_ms: int) -> int:
    """WAIT on ``connection``: how many replicas have its writes."""
    connection.send_command("WAIT", replicas, timeout_ms)
    try:
        return int(connection.read_response())
    except redis.ResponseError as error:
        if not str(error).startswith("UNBLOCKED"):
            raise
        # The primary was demoted while we waited (it closes the connection after this reply):
        # retried like a dropped connection, on whichever node is primary now.
        raise redis.ConnectionError(str(error)) from error
