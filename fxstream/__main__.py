"""``python -m fxstream plan ...``: the same as the ``fxstream`` console script."""

import sys

from .cli import main

sys.exit(main())
