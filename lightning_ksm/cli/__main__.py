"""``python -m lightning_ksm.cli``: the same as the ``lightning-ksm`` console script."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
