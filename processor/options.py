"""How a setting is declared, and how settings are read: TOML file < environment < flags.

A setting is a dataclass field made by :func:`setting`, which records its environment variable,
help, bounds, choices and validator in the field's metadata; its flag is the field's name with
dashes. The loader, the ``--help`` text and the config-file reader all work from those fields,
so a setting cannot drift between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from processor.errors import ConfigError, ExitCode

# A setting's own validator: what is wrong with a value already of the right type, or None.
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Option:
    """One setting as the loader sees it: field name, environment variable, type, bounds, help."""

    name: str
    env: str
    kind: type
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    maximum: float | None = None
    check: Check | None = None
    # The field name this setting had before a rename: its flag, variable and file key are
    # still read (the new name wins where both are given).
    formerly: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def old_env(self) -> str:
        return self.formerly.upper()

    @property
    def old_flag(self) -> str:
        return "--" + self.formerly.replace("_", "-")


@dataclass(frozen=True)
class _Declared:
    env: str
    help: str
    minimum: float | None
    choices: tuple[str, ...]
    maximum: float | None
    check: Check | None
    formerly: str


def setting(
    default: Any,
    env: str,
    help: str,
    *,
    minimum: float | None = None,
    choices: tuple[str, ...] = (),
    secret: bool = False,
    maximum: float | None = None,
    check: Check | None = None,
    formerly: str = "",
) -> Any:
    """A settings field: its default and everything the loader needs to read it.

    ``check`` is called with every value the loader reads (not the default) and returns why it
    is wrong, or None; the loader names the setting and the value's source in front of it.
    ``formerly`` is the field's name before a rename, still read as an alias.
    """
    declared = _Declared(env, help, minimum, choices, maximum, check, formerly)
    return field(default=default, repr=not secret, metadata={"setting": declared})


# A duration (a setting whose name ends in _s or _ms) is at most a week unless it says more:
# longer ones are typos, and the clocks and selectors they reach overflow on absurd values.
WEEK_S = 7 * 24 * 3600
_DURATION_MAXIMUM = {"_s": WEEK_S, "_ms": WEEK_S * 1000}


def bound(value: float) -> str:
    """A bound as people write it: 604800000, not 6.048e+08; 0.1, not 0.10000."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def _maximum(name: str, declared: float | None) -> float | None:
    if declared is not None:
        return declared
    unit = "_" + name.rpartition("_")[2]
    return _DURATION_MAXIMUM.get(unit)


def options_of(cls: type) -> list[Option]:
    """The settings of a settings dataclass, in declaration order (base classes first)."""
    options = []
    for item in dataclasses.fields(cls):
        declared = item.metadata.get("setting")
        if declared is not None:
            kind = type(item.default)
            options.append(
                Option(
                    item.name,
                    declared.env,
                    kind,
                    declared.help,
                    declared.minimum,
                    declared.choices,
                    _maximum(item.name, declared.maximum),
                    declared.check,
                    declared.formerly,
                )
            )
    return options


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

SettingsT = TypeVar("SettingsT")


def _convert(option: Option, raw: object, source: str) -> object:
    where = f"{option.env} (from {source})"
    if option.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"invalid {where}: {raw!r} is not a boolean (true/false)")
    if option.kind is int:
        if isinstance(raw, (bool, float)):
            raise ConfigError(f"invalid {where}: {raw!r} is not an integer")
        try:
            value: object = int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"invalid {where}: {raw!r} is not an integer") from None
    elif option.kind is float:
        if isinstance(raw, bool):
            raise ConfigError(f"invalid {where}: {raw!r} is not a number")
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ConfigError(f"invalid {where}: {raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"invalid {where}: {raw!r} is not a finite number")
    else:
        if not isinstance(raw, str):
            raise ConfigError(f"invalid {where}: {raw!r} is not a string")
        value = raw.upper() if option.name == "loglevel" else raw
    if option.minimum is not None and value < option.minimum:  # type: ignore[operator]
        raise ConfigError(f"invalid {where}: {raw!r} must be >= {bound(option.minimum)}")
    if option.maximum is not None and value > option.maximum:  # type: ignore[operator]
        raise ConfigError(f"invalid {where}: {raw!r} must be <= {bound(option.maximum)}")
    if option.choices and value not in option.choices:
        raise ConfigError(f"invalid {where}: {raw!r} must be one of {', '.join(option.choices)}")
    problem = option.check(value) if option.check is not None else None
    if problem is not None:
        raise ConfigError(f"invalid {where}: {problem}")
    return value


def _file_keys(option: Option) -> set[str]:
    """The keys a TOML file may give the setting under: its field name, its variable in lower
    case, its former name."""
    return {option.name, option.env.lower(), option.formerly} - {""}


def read_toml(
    path: str, options: Sequence[Option], others: Sequence[Option] = ()
) -> dict[str, object]:
    """The settings in a TOML file, keyed by field name. A key of ``others`` (settings another
    command reads from the same file) is passed over unread; any other unknown key is an
    error."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text: {error}") from None
    by_key = {option.name: option for option in options}
    by_key.update({option.env.lower(): option for option in options})
    old_keys = {option.formerly: option for option in options if option.formerly}
    passed_over = {key for option in others for key in _file_keys(option)}
    values: dict[str, object] = {}
    for key, raw in document.items():
        option = by_key.get(key.lower())
        if option is not None:
            values[option.name] = _convert(option, raw, f"config file {path}")
        elif key.lower() not in old_keys and key.lower() not in passed_over:
            raise ConfigError(f"unknown key {key!r} in config file {path}")
    for key, raw in document.items():
        old = old_keys.get(key.lower())
        if old is not None and old.name not in values:
            values[old.name] = _convert(old, raw, f"config file {path}, as {key}")
    return values


def _old(option: Option) -> str:
    """The parser's destination for a renamed setting's old flag."""
    return f"{option.name}__formerly"


class Parser(argparse.ArgumentParser):
    """A command's parser: a wrong argument is one line and exit code 2, as a wrong value is;
    argparse's default prints the whole usage (dozens of lines) before the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            ExitCode.CONFIG,
            f"{self.prog}: error: {message} ('{self.prog} --help' lists the flags it takes)\n",
        )


def _help(option: Option, defaults: Mapping[str, object]) -> str:
    choices = f" (one of: {', '.join(option.choices)})" if option.choices else ""
    return f"{option.help}{choices} [env {option.env}; default {defaults[option.name]!r}]"


def build_parser(
    prog: str,
    description: str,
    options: Sequence[Option],
    defaults: Mapping[str, object],
    others: Sequence[Option] = (),
) -> argparse.ArgumentParser:
    # No abbreviations: "status --consumers 3" would set --consumers-list, not refuse the flag
    # that belongs to "consume".
    parser = Parser(prog=prog, description=description, allow_abbrev=False)
    shared = "; the daemon's own file too: its other settings are passed over"
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML file of settings (keys as the flags, with _{shared if others else ''})",
    )
    for option in options:
        if option.formerly:
            parser.add_argument(
                option.old_flag, dest=_old(option), default=None, help=argparse.SUPPRESS
            )
        if option.kind is bool:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_help(option, defaults),
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                default=None,
                metavar=option.env,
                help=_help(option, defaults),
            )
    return parser


def load(
    cls: type[SettingsT],
    argv: Sequence[str],
    environ: Mapping[str, str],
    prog: str,
    description: str,
    extra_check: Callable[[SettingsT], None] | None = None,
    others: Sequence[Option] = (),
) -> SettingsT:
    """Settings from defaults < file < environment < flags, validated; ConfigError otherwise.
    ``others``: settings the file may hold for another command (the daemon's), passed over."""
    return load_with_args(cls, argv, environ, prog, description, extra_check, others=others)[0]


def load_with_args(
    cls: type[SettingsT],
    argv: Sequence[str],
    environ: Mapping[str, str],
    prog: str,
    description: str,
    extra_check: Callable[[SettingsT], None] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    others: Sequence[Option] = (),
) -> tuple[SettingsT, argparse.Namespace]:
    """As :func:`load`, with a command's own arguments (``add_arguments``) parsed alongside."""
    options = options_of(cls)
    defaults = {item.name: item.default for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
    parser = build_parser(prog, description, options, defaults, others)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_toml(args.config, options, others))
    for option in options:
        if option.env in environ:
            values[option.name] = _convert(option, environ[option.env], "environment")
        elif option.formerly and option.old_env in environ:
            source = f"environment, as {option.old_env}"
            values[option.name] = _convert(option, environ[option.old_env], source)
        flag_value = getattr(args, option.name)
        old_flag_value = getattr(args, _old(option), None) if option.formerly else None
        if flag_value is not None:
            values[option.name] = _convert(option, flag_value, f"flag {option.flag}")
        elif old_flag_value is not None:
            values[option.name] = _convert(option, old_flag_value, f"flag {option.old_flag}")
    settings = cls(**values)
    if extra_check is not None:
        extra_check(settings)
    return settings, args
