"""``python -m dino_nb.evaluate``: Evaluate a checkpoint's features (kNN, linear probe, figures); the program lives in :mod:`dino_nb.tools.evaluate`."""

import sys

from .tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
