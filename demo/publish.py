"""Publish demo messages from a checkout: ``python demo/publish.py --help``.

The same as the installed ``processor publish``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.cli import publish

if __name__ == "__main__":
    sys.exit(publish(sys.argv[1:], "publish.py"))
