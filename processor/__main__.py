"""``python -m processor``: the same as the ``processor`` command."""

import sys

from processor.cli import main

sys.exit(main())
