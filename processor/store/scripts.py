"""The Lua scripts shipped in ``processor/store/lua``, read from the installed package."""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from processor.errors import WrongType
from processor.store.connection import script_refusals
from processor.store.keytypes import name_wrong_key

# A line of its own naming a fragment in processor/store/lua that scripts share (bucket.lua).
_INCLUDE = re.compile(r"^-- include: (\S+)\n", re.MULTILINE)


def load_script(name: str) -> str:
    """The script's source as Redis runs it: each ``-- include: <file>`` line replaced by that
    file, so its SHA (EVALSHA) is the composed source's."""
    return _INCLUDE.sub(lambda include: _read(include.group(1)), _read(name))


def _read(name: str) -> str:
    return resources.files("processor.store").joinpath("lua", name).read_text(encoding="utf-8")


class Script:
    """One of our scripts on ``client``, called as redis-py's Script is (EVALSHA, loaded again
    if Redis lost it). A write Redis refuses inside it is raised as Redis 7 replies it, on
    Redis 6 too, so the callers' loops wait it out. ``kinds`` gives the type the daemon keeps
    at each of its KEYS (None for a prefix): a WRONGTYPE then names the key that holds
    another."""

    def __init__(self, client: redis.Redis, name: str, kinds: Sequence[str | None] = ()) -> None:
        self._client = client
        self._name = name
        self._kinds = kinds
        self._script = client.register_script(load_script(name))

    def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: redis.Redis | None = None
    ) -> Any:
        try:
            with script_refusals():
                return self._script(keys=list(keys), args=list(args), client=client)
        except WrongType as error:
            expected = list(zip(keys, self._kinds, strict=False))
            named = name_wrong_key(error, client or self._client, expected, self._name)
            if named is error:
                raise
            raise named from error
