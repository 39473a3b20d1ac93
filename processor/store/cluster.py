"""Where a slot lives on a Redis Cluster, for the connections we manage ourselves.

The Pub/Sub reader and the write path hold plain connections to one node each; after a failover
they ask here again. The layout comes from ``CLUSTER SLOTS`` on whichever known node answers
first: the node in REDIS_URL, then every node an earlier answer named, so losing the node in the
URL does not lose the cluster.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis

from processor.config import RedisSettings
from processor.store.connection import CONNECT_TIMEOUT_S, CONNECTION_ERRORS

Address = tuple[str, int]


def node_url(url: str, address: Address) -> str:
    """``url`` (scheme, credentials, TLS query) pointed at another node."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    host, port = address
    host = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}", path="/0"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClusterMap:
    """The primary serving a slot, read afresh on each call."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        parts = urlsplit(settings.url)
        self._known: list[Address] = [(parts.hostname or "localhost", parts.port or 6379)]
        # One client per node asked, kept: a subscriber asks every second.
        self._clients: dict[Address, redis.Redis] = {}

    def primary(self, slot: int) -> Address:
        last_error: Exception | None = None
        for address in list(self._known):
            try:
                layout = self._slots(address)
            except CONNECTION_ERRORS as error:
                last_error = error
                continue
            return self._primary_in(layout, slot, address)
        raise redis.ConnectionError(f"no node of the cluster answered: {last_error}")

    def url(self, address: Address) -> str:
        return node_url(self._settings.url, address)

    def _slots(self, address: Address) -> list[list[object]]:
        client = self._clients.get(address)
        if client is None:
            client = redis.Redis.from_url(
                self.url(address),
                socket_timeout=CONNECT_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                protocol=2,
                client_name="processor-cluster-map",
                **self._settings.tls_options,
            )
            self._clients[address] = client
        try:
            layout: list[list[object]] = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        except BaseException:
            self._clients.pop(address).close()
            raise
        return layout

    def _primary_in(self, layout: list[list[object]], slot: int, asked: Address) -> Address:
        found: Address | None = None
        nodes: list[Address] = [asked]
        for start, end, *members in layout:
            for position, member in enumerate(members):
                host, port = member[0], member[1]  # type: ignore[index]
                # An empty host means "the node you asked" (cluster-announce-hostname unset).
                address = (_text(host) or asked[0], int(port))
                if address not in nodes:
                    nodes.append(address)
                if position == 0 and int(start) <= slot <= int(end):  # type: ignore[call-overload]
                    found = address
        self._known = nodes + [address for address in self._known if address not in nodes]
        if found is None:
            raise redis.exceptions.ClusterDownError(f"no node serves slot {slot}")
        return found
