"""Run the consumer daemon from a checkout: ``python demo/consume.py --help``.

The same as the installed ``processor consume``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.cli import consume

if __name__ == "__main__":
    sys.exit(consume(sys.argv[1:], "consume.py"))
