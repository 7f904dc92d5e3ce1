"""``python -m cramkit``: the same command line as the ``cramkit`` console script."""

import sys

from .cli import main

sys.exit(main())
