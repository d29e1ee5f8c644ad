"""Checkpoints that survive a crash mid-write and load without unpickling code.

Three layers of safety: :func:`save_atomic` never leaves a half-written file under the
final name; with ``keep_previous=True`` the run's ``checkpoint.pth`` keeps the copy before
it as ``checkpoint.prev.pth``, which :func:`load_with_fallback` uses when the newest copy
was damaged afterwards (a copy cut short, a full disk, a bad sync); and :func:`load` reads
tensors and plain containers only (``weights_only=True``), so opening a checkpoint cannot
run code. A file that does not load gets one message naming it and saying what it is.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: File names inside a run folder.
LAST = "checkpoint.pth"
BEST = "best_model.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_atomic` keeps the previous copy: ``checkpoint.pth -> checkpoint.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (not possible on every OS or file system)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, keep_previous: bool = False) -> Iterator[Path]:
    """Write ``path`` all at once: yields a temporary file beside it, then fsyncs and renames it.

    The project's one way to write a file that must never be seen half written (checkpoints,
    embeddings, the pixel cache): a crash or a kill at any point leaves either the old file or
    the new one under ``path``, never a truncated one. The temporary file is removed on error.

    Args:
        path: the final file name; its folder is created.
        keep_previous: keep the file being replaced as :func:`previous_path` (the run's
            ``checkpoint.pth``). The previous copy is hard-linked into place before the new
            file replaces ``path``, so ``path`` never goes missing; where links are not
            supported the old file is renamed instead, and for that instant the previous
            copy is the good one.

    Yields:
        the temporary file's path: write it completely (by name, not by a file object kept open).

    Examples:
        >>> with atomic_file("out/embeddings.npy") as tmp:  # doctest: +SKIP
        ...     np.save(tmp.open("wb"), features)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs may be shared
        if keep_previous and path.is_file():
            _keep_previous(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _keep_previous(path: Path, tmp: Path) -> None:
    """Put the current ``path`` at :func:`previous_path`, leaving ``path`` in place if it can."""
    prev = previous_path(path)
    link = Path(f"{tmp}.prev")
    try:
        os.link(path, link)  # the previous copy, while path still holds the same file
        os.replace(link, prev)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, prev)  # no hard links here: for an instant only prev and tmp exist


def save_atomic(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> Path:
    """``torch.save`` through :func:`atomic_file`: the file is the old one or the new one, never half.

    Args:
        obj: what to save: tensors and plain containers, so that :func:`load` accepts it.
        path: the final file name.
        keep_previous: keep the replaced file as :func:`previous_path` (see :func:`atomic_file`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_file(path, keep_previous) as tmp:
        torch.save(obj, tmp)
    return Path(path)


#: The first bytes of a zip archive (PyTorch's format since 1.6) and of the legacy format's pickle.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _diagnose(path: Path, error: Exception) -> str:
    """What is wrong with a file ``torch.load`` refused, from its bytes, in words."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): the write or copy that made it stopped before any data"
    # torch 2.4+ names the class as "GLOBAL mod.Class", torch 2.3 as "Unsupported class mod.Class"
    globals_ = re.findall(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and globals_:
        return (
            f"holds a Python object ({globals_[0]}), not only tensors and plain containers; it is "
            "refused because unpickling it could run code. dino-nb checkpoints never hold one: "
            "this file was written by something else"
        )
    with open(path, "rb") as f:
        head = f.read(64)
    cut = f"is truncated ({size} bytes): the write or copy that made it was cut short"
    if _ZIP_MAGIC.startswith(head[:4]) and (len(head) < 4 or not zipfile.is_zipfile(path)):
        return cut + " (the end of its zip archive is missing)"
    if head.startswith(_ZIP_MAGIC):
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return "is a zip archive but not a PyTorch checkpoint (it has no data.pkl)"
            bad = archive.testzip()
        return f"is corrupted (damaged entry {bad} in its zip archive)" if bad else _reason(error)
    if head.startswith(_LEGACY_MAGIC):
        return "is truncated or corrupted (PyTorch's legacy format)"
    if head.startswith(b"\x80"):
        return "is a Python pickle, not a PyTorch checkpoint"
    if all(b >= 32 or b in b"\t\n\r\f" for b in head):  # no control bytes: text
        text = head.decode("utf-8", errors="replace")[:40]
        return f"is a text file, not a PyTorch checkpoint (it starts with {text!r})"
    return f"is not a PyTorch checkpoint (it starts with the bytes {head[:16]!r})"


def _reason(error: Exception) -> str:
    """``torch.load``'s complaint about a well-formed archive, without its weights_only=False advice."""
    message = str(error)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1].split(
            "Check the documentation", 1
        )[0]
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if "weights_only" in first or not first:
        first = "its contents cannot be unpickled as tensors and plain containers"
    return f"could not be read ({type(error).__name__}: {first})"


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: (a ``RuntimeError``) when the file is empty, truncated, not a PyTorch
            checkpoint, or holds Python objects; one message naming the file and saying which.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        # from None: torch's own text advises weights_only=False, which would run the file's code
        raise CheckpointError(f"checkpoint {path} {_diagnose(path, e)}") from None


def load_with_fallback(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path]:
    """Load ``path``, or its previous copy (:func:`previous_path`) with a warning if it does not load.

    Returns:
        ``(state, the path it came from)``.

    Raises:
        FileNotFoundError: when neither file exists.
        CheckpointError: when neither loads, with both reasons.
    """
    path = Path(path)
    prev = previous_path(path)
    try:
        return load(path, map_location), path
    except (FileNotFoundError, CheckpointError) as newest:
        if not prev.is_file():
            raise
        try:
            state = load(prev, map_location)
        except CheckpointError as older:
            raise CheckpointError(f"neither copy loads: {newest}; and {older}") from None
        warnings.warn(f"{newest}; using the previous copy {prev}", stacklevel=2)
        return state, prev


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


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """This process's random states, in forms that ``torch.load(weights_only=True)`` accepts.

    Args:
        device: the CUDA device this process trains on; its generator is saved as ``cuda``
            (one state: under ``torchrun`` each rank saves and restores its own). ``None``:
            the current CUDA device where CUDA is available.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    device = torch.device(device) if device is not None else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of :func:`rng_state`, whatever device the saved tensors were loaded to.

    The generators' states must be CPU byte tensors; a checkpoint loaded with
    ``map_location="cuda"`` (or any other device) is moved back first.

    Args:
        state: what :func:`rng_state` returned.
        device: the CUDA device to restore ``cuda`` to; ``None``: the current one.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    saved = state.get("cuda")
    if saved is None or not torch.cuda.is_available():
        return
    device = torch.device(device) if device is not None else None
    if isinstance(saved, list | tuple):  # written before each rank saved its own: all devices
        torch.cuda.set_rng_state_all([s.cpu() for s in saved])
    elif device is None or device.type == "cuda":
        torch.cuda.set_rng_state(saved.cpu(), device if device is not None else "cuda")
