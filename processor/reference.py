"""The configuration reference, docs/configuration.md, rendered from the settings' declarations.

``python -m processor.reference > docs/configuration.md`` (or ``make docs``) regenerates it;
tests/test_docs.py checks that the file equals what :func:`render` returns, so the reference
cannot drift from the code that reads the settings.
"""

from __future__ import annotations

import sys

from processor import config
from processor.options import Option, bound, options_of

REGENERATE = "python -m processor.reference > docs/configuration.md"

# Which settings class each command reads.
COMMANDS: tuple[tuple[str, type], ...] = (
    ("processor consume", config.Settings),
    ("processor publish", config.PublisherSettings),
    ("processor status", config.StatusSettings),
    ("processor scale, stop, start, dead-letters and replay", config.GroupSettings),
)

TITLES: dict[type, str] = {
    config.RedisSettings: "Reaching Redis",
    config.GroupSettings: "The group's keys",
    config.Settings: "The daemon",
    config.PublisherSettings: "The publisher",
    config.StatusSettings: "Status",
}

# Defaults computed from the machine that imports config: shown as the rule that computes them,
# so the reference reads the same wherever it is rendered.
MACHINE_DEFAULTS: dict[str, str] = {
    "host_id": "the machine's host name",
    "max_consumers": f"the CPU count, at most {config.MAX_CONSUMERS_PER_HOST}",
}

HEADER = f"""\
# Configuration reference

<!-- Generated from the settings' declarations in processor/config.py: do not edit by hand.
     Regenerate with `make docs` ({REGENERATE}). -->

Every setting is a command-line flag, an environment variable and a key of the optional TOML
file (`--config FILE`, keys as the flag names with `_`, or the variable names in lower case).
Precedence: flag > environment > file > default. A wrong value stops the program at start with
one line naming the setting, exit code 2. The line says where the value came from
(`invalid REDIS_URL (from environment): 'http://h/0' is not a redis://, rediss:// or unix://
URL`; `(from flag --redis-port)`, `(from config file F)`), in every command. `REDIS_URL` is
checked as redis-py reads it, and more strictly: a path that is not a database number
(`redis://h/abc`, which redis-py quietly reads as database 0) is refused; a database the server
does not have (`/99` with 16 databases) is refused when first connected, also one line and exit
code 2.

```toml
# processor.toml
consumers_count = 4
strategy = "partitioned"
handler = "myapp.handlers:enrich"
handler_concurrency = 16
```

The other commands take the daemon's file as it is (`processor status --config processor.toml`),
so that they find the keys the daemon writes: each reads the settings it uses (the tables below
say which) and passes over the daemon's others. A key that is neither the command's setting nor
the daemon's is refused with one line naming it (`unknown key 'consumer_count' in config file
processor.toml`), exit code 2.

What a handler is and how its failures are handled: [operating.md](operating.md#handlers).
Settings that only make sense together are checked together at start (for example
`TAKEOVER_BUFFER_MS` must exceed `HEARTBEAT_TTL_MS` + 2 x `HEARTBEAT_INTERVAL_MS`, and
`DEDUP_WINDOW_MS` twice `TAKEOVER_BUFFER_MS`), with the same one line and exit code 2.
"""


def _default(option: Option, value: object) -> str:
    if option.name in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[option.name]
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return "unset"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _allowed(option: Option) -> str:
    if option.choices:
        return ", ".join(f"`{choice}`" for choice in option.choices)
    if option.minimum is not None and option.maximum is not None:
        return f"{bound(option.minimum)} to {bound(option.maximum)}"
    if option.minimum is not None:
        return f">= {bound(option.minimum)}"
    if option.maximum is not None:
        return f"<= {bound(option.maximum)}"
    return ""


def _flag(option: Option) -> str:
    if option.kind is bool:
        return f"`{option.flag}`, `--no-{option.flag[2:]}`"
    return f"`{option.flag}`"


def _row(option: Option, default: object) -> str:
    cells = (
        f"`{option.env}`",
        _flag(option),
        _default(option, default),
        _allowed(option),
        option.help.replace("|", "\\|"),
    )
    return "| " + " | ".join(cells) + " |"


def _sections() -> list[type]:
    """Every settings class the commands read, base classes first."""
    classes: list[type] = []
    for _, cls in COMMANDS:
        for base in reversed(cls.__mro__):
            if base not in classes and _own_options(base):
                classes.append(base)
    return classes


def _own_options(cls: type) -> list[Option]:
    """The settings ``cls`` declares itself, not those it inherits."""
    if not hasattr(cls, "__dataclass_fields__"):
        return []
    inherited = {
        option.name
        for base in cls.__mro__[1:]
        if hasattr(base, "__dataclass_fields__")
        for option in options_of(base)
    }
    return [option for option in options_of(cls) if option.name not in inherited]


def _section(cls: type) -> str:
    commands = [name for name, command_cls in COMMANDS if issubclass(command_cls, cls)]
    lines = [
        f"## {TITLES.get(cls, cls.__name__)}",
        "",
        "Read by " + ", ".join(f"`{name}`" for name in commands) + ".",
        "",
        "| variable | flag | default | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    lines += [_row(option, getattr(cls, option.name)) for option in _own_options(cls)]
    return "\n".join(lines) + "\n"


def render() -> str:
    """docs/configuration.md: the prose header, then one table per settings class."""
    return "\n".join([HEADER, *(_section(cls) for cls in _sections())])


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
