"""The ``processor`` command: ``consume`` (the daemon), ``publish`` (demo messages), ``status``,
and the control plane's ``scale``, ``stop`` and ``start``.

Each subcommand parses its own flags (``processor consume --help``), refuses the flags of the
others, and names itself in help and error lines as the user typed it. ``--version`` (``-V``)
prints the version. Wrong settings, unknown flags and refused credentials exit with code 2 and
one line; a daemon that gave up waiting for Redis at start (STARTUP_TIMEOUT) exits with code 4;
a publisher that could publish nothing, a control command or ``status`` that could not reach
Redis exit with code 1; ``status`` exits with code 5 when no consumer of the group is live;
anything else is the subcommand's own exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from processor.errors import ConfigError, ExitCode, StartupTimeout

USAGE = """usage: {prog} COMMAND [options]
       {prog} --version

Consume a Redis Pub/Sub channel into an exactly-once Redis Stream.

commands:
  consume   run the consumer daemon (a supervised group of consumer processes)
  publish   publish demo messages to the channel, in bursts or at a steady rate
  status    show the group: hosts, live consumers, counts, streams, dead letters, gaps
  scale     set the size of the whole group, split across its hosts (scale N, scale --clear)
  stop      ask every daemon of the group, on every host, to stop gracefully
  start     clear a group stop, so daemons may start again
  dead-letters  list the recent dead letters (newest first, by reason, --json)
  replay    publish chosen dead letters again, once the handler is fixed

'{prog} COMMAND --help' describes a command's options.
"""

# The daemon's signals (processor.group.slot.BLOCKED): held from its first moment until the
# supervisor has its handlers in, so a SIGTERM while it imports and checks its settings still
# stops it gracefully (exit 0) instead of killing it.
DAEMON_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP)


def consume(argv: Sequence[str], prog: str) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
    from processor.group.supervisor import run
    from processor.handlers import load_handler
    from processor.loading import load_daemon_settings
    from processor.observe.logs import configure_logging
    from processor.observe.titles import set_title, supervisor_title

    try:
        settings = load_daemon_settings(argv, prog=prog)
    except ConfigError as error:
        # Before the settings are known, so is LOG_FORMAT: this one line is always text.
        print(f"{prog}: error: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    # Before the handler's import, so what it logs or warns there is in the chosen format.
    configure_logging(settings.loglevel, settings.log_format)
    set_title(supervisor_title(settings))
    try:
        load_handler(settings.handler)
        return run(settings, reload=lambda: load_daemon_settings(argv, prog=prog))
    except ConfigError as error:
        return _failed(prog, error, ExitCode.CONFIG, settings.log_format)
    except StartupTimeout as error:
        return _failed(prog, error, ExitCode.STARTUP_TIMEOUT, settings.log_format)


def _failed(prog: str, error: Exception, code: ExitCode, log_format: str) -> int:
    """The daemon's one error line: a JSON object like every other line with LOG_FORMAT=json."""
    if log_format == "json":
        logging.getLogger(__name__).error(
            "%s: error: %s", prog, error, extra={"exit_code": int(code)}
        )
    else:
        print(f"{prog}: error: {error}", file=sys.stderr)
    return code


def publish(argv: Sequence[str], prog: str) -> int:
    from processor.commands.publish import Publisher
    from processor.loading import load_publisher_settings
    from processor.observe.logs import configure_logging

    try:
        settings = load_publisher_settings(argv, prog=prog)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    configure_logging(settings.loglevel, settings.log_format)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        report = Publisher(settings, stop).run()
    except ConfigError as error:  # known only once connected: a database Redis does not have
        print(f"{prog}: error: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    print(report.line(), flush=True)
    # A run that reached Redis now and then did its best (the line counts it); one that never
    # did published nothing.
    return ExitCode.UNREACHABLE if report.unavailable and not report.published else ExitCode.OK


def status(argv: Sequence[str], prog: str) -> int:
    from processor.commands.status import main as status_main

    try:
        return status_main(argv, prog)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return ExitCode.CONFIG


def _control(command: Callable[[Sequence[str], str], int], argv: Sequence[str], prog: str) -> int:
    try:
        return command(argv, prog)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return ExitCode.CONFIG


def scale(argv: Sequence[str], prog: str) -> int:
    from processor.commands import group as commands

    return _control(commands.scale, argv, prog)


def stop(argv: Sequence[str], prog: str) -> int:
    from processor.commands import group as commands

    return _control(commands.stop, argv, prog)


def start(argv: Sequence[str], prog: str) -> int:
    from processor.commands import group as commands

    return _control(commands.start, argv, prog)


def dead_letters(argv: Sequence[str], prog: str) -> int:
    from processor.commands import deadletters

    return _control(deadletters.main, argv, prog)


def replay(argv: Sequence[str], prog: str) -> int:
    from processor.commands import replay as command

    return _control(command.main, argv, prog)


COMMANDS: dict[str, Callable[[Sequence[str], str], int]] = {
    "consume": consume,
    "publish": publish,
    "status": status,
    "scale": scale,
    "stop": stop,
    "start": start,
    "dead-letters": dead_letters,
    "replay": replay,
}


def program_name(argv0: str) -> str:
    """How the user started us: ``processor``, or ``python -m processor``."""
    if os.path.basename(argv0) == "__main__.py":
        return "python -m processor"
    return os.path.basename(argv0) or "processor"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program_name(sys.argv[0])
    if args and args[0] in ("-V", "--version"):
        from processor.version import version

        print(f"processor {version()}")
        return ExitCode.OK
    if not args or args[0] in ("-h", "--help"):
        print(USAGE.format(prog=prog), end="")
        return ExitCode.OK if args else ExitCode.CONFIG
    command = COMMANDS.get(args[0])
    if command is None:
        print(
            f"{prog}: error: unknown command {args[0]!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    return command(args[1:], f"{prog} {args[0]}")
