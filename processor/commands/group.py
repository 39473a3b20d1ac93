"""``processor scale``, ``processor stop`` and ``processor start``: the control plane's commands.

Each writes one thing under ``KEY_PREFIX`` and returns; the daemons on every host follow within
a beat (about half a second). :mod:`processor.group.controlplane` describes the keys.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import redis

from processor.config import MAX_CONSUMERS_PER_HOST
from processor.errors import ConfigError, ExitCode
from processor.group import controlplane
from processor.loading import count_arg, load_group_command
from processor.store.connection import (
    CONNECTION_ERRORS,
    REFUSALS,
    command_session,
    explain,
)
from processor.store.keys import Keys

Action = Callable[[redis.Redis, Keys, argparse.Namespace], str]


def _size(text: str) -> int:
    return count_arg(text, " (to stop: processor stop)")


def _run(
    argv: Sequence[str],
    prog: str,
    description: str,
    action: Action,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parses, connects, runs ``action`` and prints what it did; one line on failure."""
    settings, args = load_group_command(argv, prog, description, arguments)
    try:
        with command_session(settings, prog.replace(" ", "-"), 5.0) as client:
            print(action(client, Keys.from_settings(settings), args), flush=True)
    except redis.AuthenticationError as error:
        return _failed(prog, f"Redis refused the credentials in REDIS_URL: {error}")
    except REFUSALS as error:
        return _failed(
            prog, f"Redis at {settings.safe_url} refuses writes: {error.status_code} {error}"
        )
    except CONNECTION_ERRORS as error:
        return _failed(
            prog, f"Redis at {settings.safe_url} unreachable: {explain(error, settings.url)}"
        )
    except redis.ResponseError as error:
        return _failed(prog, f"Redis refused the command: {error}")
    return ExitCode.OK


def _failed(prog: str, why: str) -> int:
    print(f"{prog}: error: {why}", file=sys.stderr)
    return ExitCode.UNREACHABLE


def _hosts(client: redis.Redis, keys: Keys) -> str:
    _, hosts = controlplane.read_control(client, keys)
    if not hosts:
        return "no live host yet: daemons take their share when they start"
    return "live hosts: " + ", ".join(sorted(hosts))


def _check_size(client: redis.Redis, keys: Keys, size: int) -> None:
    """No host runs more than MAX_CONSUMERS_PER_HOST: a size the live hosts (one, before any
    has started) could never run is a typo, refused rather than left as a shortfall."""
    if size <= MAX_CONSUMERS_PER_HOST:
        return  # within what one host may run: no need to count them
    hosts = len(controlplane.read_control(client, keys)[1])
    most = MAX_CONSUMERS_PER_HOST * max(hosts, 1)
    if size > most:
        runners = f"the {hosts} live hosts" if hosts > 1 else "one host"
        raise ConfigError(
            f"invalid size: {size} is more than {most}, the most {runners} may run "
            f"(at most {MAX_CONSUMERS_PER_HOST} consumers per host; start more hosts first)"
        )


def scale(argv: Sequence[str], prog: str) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        choice = parser.add_mutually_exclusive_group(required=True)
        choice.add_argument(
            "size", nargs="?", type=_size, help="consumers in the whole group, over all hosts"
        )
        choice.add_argument(
            "--clear",
            action="store_true",
            help="remove the desired size: each host runs its CONSUMERS_COUNT again",
        )

    def action(client: redis.Redis, keys: Keys, args: argparse.Namespace) -> str:
        if args.clear:
            by = controlplane.who("processor scale --clear")
            previous = controlplane.clear_desired(client, keys, by)
            return f"desired size cleared (was {previous or 'unset'}): hosts run CONSUMERS_COUNT"
        _check_size(client, keys, args.size)
        by = controlplane.who("processor scale")
        _, previous = controlplane.set_desired(client, keys, args.size, by)
        return f"desired {previous or 'unset'} -> {args.size}; {_hosts(client, keys)}"

    description = (
        "Set the size of the whole group, split across the live hosts; clears a group stop."
    )
    return _run(argv, prog, description, action, arguments)


def stop(argv: Sequence[str], prog: str) -> int:
    def action(client: redis.Redis, keys: Keys, args: argparse.Namespace) -> str:
        controlplane.request_stop(client, keys, controlplane.who("processor stop"))
        return (
            f"group stop requested: every daemon drains, writes, leaves and exits 0; "
            f"{_hosts(client, keys)}; 'processor start' or 'processor scale N' clears it"
        )

    description = "Ask every daemon of the group, on every host, to stop gracefully."
    return _run(argv, prog, description, action)


def start(argv: Sequence[str], prog: str) -> int:
    def action(client: redis.Redis, keys: Keys, args: argparse.Namespace) -> str:
        if controlplane.clear_stop(client, keys):
            return "group stop cleared: daemons may start again"
        return "no group stop was set"

    description = "Clear a group stop, so daemons may start again."
    return _run(argv, prog, description, action)
