"""Run the consumer daemon: ``python demo/consume.py --help``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.config import load_daemon_settings
from processor.errors import EXIT_CONFIG, ConfigError
from processor.handlers import load_handler
from processor.logs import configure_logging
from processor.supervisor import run


def main(argv: list[str]) -> int:
    try:
        settings = load_daemon_settings(argv)
        load_handler(settings.handler)
    except ConfigError as error:
        print(f"consume.py: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.loglevel)
    try:
        return run(settings)
    except ConfigError as error:
        print(f"consume.py: error: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
