"""``python -m dino_nb.train``: the command line is :mod:`dino_nb.tools.cli`, the loop :mod:`dino_nb.loop`.

``from dino_nb.train import train`` keeps working: the loop's public names are here too.
"""

import sys

from .loop import NonFiniteLossError, TrainResult, export_backbone, train
from .tools.cli import train_main as main

__all__ = ["NonFiniteLossError", "TrainResult", "export_backbone", "main", "train"]

if __name__ == "__main__":
    sys.exit(main())
