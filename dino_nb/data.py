"""``python -m dino_nb.data``: Find or download ImageNette; the program lives in :mod:`dino_nb.tools.data`."""

import sys

from .tools.data import main

if __name__ == "__main__":
    sys.exit(main())
