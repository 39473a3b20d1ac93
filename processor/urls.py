"""Redis URLs as the settings take them: what redis-py would refuse or misread, and how one is
shown in logs and error lines (its password masked)."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.connection import parse_url

URL_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_PORT = 65535


def secret_free(url: str) -> str:
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
            return secret_free(url)
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


def host_problem(host: str) -> str | None:
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
