"""Publish bursts of JSON messages: ``python demo/publish.py --help``."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.config import load_publisher_settings
from processor.errors import EXIT_CONFIG, ConfigError
from processor.logs import configure_logging
from processor.publisher import Publisher


def main(argv: list[str]) -> int:
    try:
        settings = load_publisher_settings(argv)
    except ConfigError as error:
        print(f"publish.py: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.loglevel)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    report = Publisher(settings, stop).run()
    print(report.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
