"""``python -m dino_nb.embed``: Embed a folder of photos and search it; the program lives in :mod:`dino_nb.tools.embed`."""

import sys

from .tools.embed import main

if __name__ == "__main__":
    sys.exit(main())
