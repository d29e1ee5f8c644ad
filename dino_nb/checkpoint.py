"""Checkpoints that survive a crash mid-write and load without unpickling code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

#: File names inside a run folder.
LAST = "checkpoint.pth"
BEST = "best_model.pth"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync it, then ``os.replace``.

    A crash or a kill at any point leaves either the old file or the new one, never a
    truncated file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        RuntimeError: when the file is not a loadable checkpoint, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise RuntimeError(f"could not load checkpoint {path}: {e}") from e


def backbone_state_dict(
    path: str | os.PathLike, which: str = "teacher", map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone weights of the student or the teacher in a training checkpoint.

    Args:
        path: ``checkpoint.pth`` or ``best_model.pth`` of a run.
        which: ``"teacher"`` (what the paper evaluates) or ``"student"``.
        map_location: device to load the tensors on.

    Returns:
        ``(state_dict, config)``: the ``MultiCropWrapper``'s ``backbone.*`` entries with
        the prefix removed (the keys of a plain timm model), and the run's config dict.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state = load(path, map_location=map_location)
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in state[which].items() if k.startswith(prefix)}
    return weights, state["config"]
