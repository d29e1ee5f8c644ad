"""Root pytest configuration: notebooks run in the small, deterministic ``ci`` profile.

``pytest`` (see ``pyproject.toml``) runs the unit tests and, with ``--nbval``, every
notebook in strict mode: stored outputs are compared with fresh ones. Kernels inherit
this process's environment, so the profile set here reaches them.
"""

import os
from pathlib import Path

# the notebooks' first cell reads this (dino_nb.explore.pick_profile); ci = committed outputs
os.environ.setdefault("DINO_NB_PROFILE", "ci")
# one BLAS/OpenMP thread in kernels too: printed numbers then repeat across machines
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

SANITIZE = Path(__file__).resolve().parent / "notebooks" / "nbval_sanitize.cfg"


def pytest_configure(config):
    """Use the repository's sanitize file wherever pytest was started from."""
    if hasattr(config.option, "nbval_sanitize_with") and not config.option.nbval_sanitize_with:
        config.option.nbval_sanitize_with = str(SANITIZE)
