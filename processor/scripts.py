"""The Lua scripts shipped in ``processor/lua``, read from the installed package."""

from __future__ import annotations

from importlib import resources


def load_script(name: str) -> str:
    return resources.files("processor").joinpath("lua", name).read_text(encoding="utf-8")
