"""``python -m mcattn``: the ``mcattn`` command (mcattn/cli.py) without the console script."""

import sys

from .cli import main

sys.exit(main())
