"""Decode each photo once, then cut every epoch's views from memory, batched, in the loader.

On 2 CPU cores at small resolutions (64-pixel global crops) the PIL path
(:class:`~dino_nb.augment.DataAugmentation` per image) spends its time decoding JPEGs and
drawing ten small views one at a time. Here:

1. **Pixel cache.** :func:`canvas_cache` decodes every photo of an ``ImageFolder`` split
   once, shrinks it to a square uint8 canvas with :class:`~dino_nb.fast.crops.DecodeResize`
   (short side to ``canvas``, central square, JPEG draft decoding) and keeps all of them in
   one ``(N, 3, C, C)`` ``.npy`` file, opened memory-mapped: the loader then reads pixels
   from the page cache, never a JPEG. The file is keyed by a fingerprint of the files
   (relative paths, sizes, modification times, labels, in dataset order), the canvas and
   the Pillow version, so it is rebuilt whenever one changes, never served stale.
   :class:`CachedCanvases` is the dataset view of it.
2. **Batched augmentation on the CPU.** :class:`MultiCropCollate` stacks a batch of
   canvases and runs :class:`~dino_nb.fast.crops.GPUMultiCrop` on it inside the loader
   worker (vectorised over the batch: one crop-and-resize call per resolution instead of
   one PIL call per view), with a generator seeded from the batch's per-sample seeds, so
   the same batch always gets the same views. It returns what
   :func:`dino_nb.loader.collate_crops` returns for the PIL path, so the training loop does
   not know which path made the batch.

Where the cache lives: ``<data>/.dino_nb_cache/`` beside the split folders (``<data>`` is
the folder holding ``train/``), or, when that is read-only, ``$DINO_NB_CACHE`` or
``~/.cache/dino_nb/``. A folder without write permission bits counts as read-only even for
root. Writes go through :func:`dino_nb.checkpoint.atomic_file`: a killed build leaves no
partial file under the final name.

Examples:
    >>> aug = DataAugmentation(n_local_crops=6, global_size=64, local_size=32, normalize=False)
    >>> bundle = build_datasets("builtin", aug, eval_size=64)
    >>> train_set = WithSeeds(CachedCanvases(bundle.train_plain, canvas=73))
    >>> sampler = TrainSampler(len(train_set), batch_size=64, seed=0)
    >>> loader = make_loader(train_set, 64, sampler=sampler, drop_last=True, num_workers=1,
    ...                      collate_fn=MultiCropCollate(aug))
    >>> crops, labels = next(iter(loader))  # 2 x (64, 3, 64, 64), 6 x (64, 3, 32, 32) uint8
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..augment import MultiCropSettings
from ..checkpoint import atomic_file
from ..datasets import DataWarning
from .crops import DecodeResize, GPUMultiCrop

#: Environment variable naming the fallback cache folder (default ``~/.cache/dino_nb``).
CACHE_ENV = "DINO_NB_CACHE"
#: Name of the cache folder beside the split folders.
CACHE_FOLDER = ".dino_nb_cache"
#: Bump when the resize rule or the file layout changes: old caches are then rebuilt.
_FORMAT = "dino_nb canvas cache v1"

# ----------------------------------------------------------------------------- the pixel cache


def fingerprint(dataset: Any, canvas: int) -> str:
    """SHA-256 of what the cached pixels depend on: the files, their order, the canvas, Pillow.

    Per sample, in dataset order: the path relative to ``dataset.root``, the size in
    bytes, the modification time in nanoseconds and the label. Only ``stat`` calls, no
    reads: about 10 µs per file.
    """
    root = Path(dataset.root)
    h = hashlib.sha256(f"{_FORMAT}\ncanvas {canvas}\nPillow {PIL.__version__}\n".encode())
    for path, target in dataset.samples:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is in the dataset but no longer on disk; open the dataset again"
            ) from None
        h.update(
            f"{os.path.relpath(path, root)}\t{st.st_size}\t{st.st_mtime_ns}\t{target}\n".encode()
        )
    return h.hexdigest()


def cache_folders(root: str | os.PathLike) -> list[Path]:
    """Where the cache of the image folder ``root`` (e.g. ``<data>/train``) may live, preferred first.

    ``<data>/.dino_nb_cache`` beside the split (not inside it: torchvision's own
    ``ImageFolder`` would take a folder there for a class), then a folder named after
    ``<data>`` under ``$DINO_NB_CACHE`` or ``~/.cache/dino_nb``.
    """
    data = Path(root).resolve().parent
    home = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dino_nb").expanduser()
    tag = hashlib.sha256(str(data).encode()).hexdigest()[:8]  # two datasets named alike stay apart
    return [data / CACHE_FOLDER, home / f"{data.name or 'root'}-{tag}"]


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder``, which is made when missing.

    A folder without any write permission bit counts as read-only even for root (who may
    write anywhere): a shared, read-only data folder stays untouched.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.stat().st_mode & 0o222 or not os.access(existing, os.W_OK | os.X_OK):
            return False
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return bool(folder.stat().st_mode & 0o222) and os.access(folder, os.W_OK | os.X_OK)


def _open(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """Memory-map a cache file; ``ValueError`` when it is damaged or of another shape."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError("not a .npy file")
    array = np.load(path, mmap_mode="r")  # raises on a bad header or a truncated file
    if array.dtype != np.uint8 or array.shape != shape:
        raise ValueError(f"it holds {array.dtype} {array.shape}, expected uint8 {shape}")
    return array


def _decode(decode: DecodeResize, path: str) -> np.ndarray:
    """One file to its ``(3, C, C)`` uint8 canvas, or an ``OSError`` that names the file."""
    try:
        return decode(decode.open(path)).numpy()
    except Exception as err:  # any decoder failure: name the file, keep the cause
        raise OSError(
            f"cannot decode {path} for the pixel cache: {type(err).__name__}: {err}"
        ) from err


def _build(
    samples: Sequence[tuple[str, int]], canvas: int, path: Path, progress: bool, workers: int
) -> None:
    """Decode every sample into a temporary ``.npy`` beside ``path``, then rename it to ``path``."""
    shape = (len(samples), 3, canvas, canvas)
    decode = DecodeResize(canvas)
    # PIL releases the GIL while decoding; on error the pending decodes are cancelled
    with atomic_file(path) as tmp, ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=shape
            )  # (N, 3, C, C)
            results = pool.map(_decode, [decode] * len(samples), [p for p, _ in samples])
            desc = f"caching {len(samples)} images at {canvas}px"
            for i, pixels in enumerate(
                tqdm(results, total=len(samples), desc=desc, unit="img", disable=not progress)
            ):
                out[i] = pixels
            out.flush()
            del out
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def canvas_cache(
    dataset: Any,
    canvas: int,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    workers: int | None = None,
) -> np.memmap:
    """All images of an ``ImageFolder`` as square uint8 canvases, decoded once and memory-mapped.

    Pixel ``i`` is exactly ``DecodeResize(canvas)(DecodeResize(canvas).open(path_i))``.
    The first call decodes (with a progress bar) and writes the cache file; later calls
    only ``stat`` the files (see :func:`fingerprint`) and map the file. A damaged cache file
    (truncated, not a ``.npy``, another shape) is rebuilt after one :class:`DataWarning`;
    older caches of the same split and canvas are deleted once the new one is written.

    Args:
        dataset: an ``ImageFolder`` (``.root``, ``.samples``), e.g.
            ``build_datasets(...).train_plain``; its transform is not used.
        canvas: side of the square canvas in pixels (at least the global crop size).
        cache_dir: folder to use instead of :func:`cache_folders`'s choice.
        progress: show a progress bar while decoding.
        workers: decoding threads; default ``min(4, cpu_count)``.

    Returns:
        A read-only memory-mapped array ``(N, 3, canvas, canvas)`` uint8, in dataset order.

    Raises:
        OSError: an image cannot be decoded (names the file), or no cache folder is
            writable (names the folders tried).
    """
    if canvas <= 0:
        raise ValueError(f"canvas must be positive, got {canvas}")
    if not hasattr(dataset, "samples") or not hasattr(dataset, "root"):
        raise TypeError(
            f"canvas_cache needs an ImageFolder (.root, .samples), got {type(dataset).__name__}"
        )
    samples = list(dataset.samples)
    if not samples:
        raise ValueError(f"{dataset.root} holds no images to cache")
    shape = (len(samples), 3, canvas, canvas)
    prefix = f"{Path(dataset.root).name}-{canvas}px-"
    name = f"{prefix}{fingerprint(dataset, canvas)[:16]}.npy"
    folders = (
        [Path(cache_dir).expanduser()] if cache_dir is not None else cache_folders(dataset.root)
    )

    for folder in folders:  # a valid cache anywhere, even in a read-only folder, is used
        path = folder / name
        if path.is_file():
            try:
                return _open(path, shape)
            except (ValueError, OSError, EOFError) as err:
                warnings.warn(
                    f"pixel cache {path} is damaged ({err}); rebuilding it",
                    DataWarning,
                    stacklevel=2,
                )
    for folder in folders:
        if _writable(folder):
            path = folder / name
            _build(samples, canvas, path, progress, workers or min(4, os.cpu_count() or 1))
            for old in folder.iterdir():  # caches of the same split and canvas for older files
                if old.name.startswith(prefix) and old.name.endswith(".npy") and old.name != name:
                    old.unlink(missing_ok=True)
            return _open(path, shape)
    tried = ", ".join(str(f) for f in folders)
    raise PermissionError(
        f"no writable folder for the pixel cache of {dataset.root} (tried {tried}); "
        f"set ${CACHE_ENV} to a writable folder or pass cache_dir"
    )


class CachedCanvases(Dataset):
    """An ``ImageFolder`` split as cached uint8 canvases: ``dataset[i] -> (canvas (3, C, C), label)``.

    Built once per split and canvas with :func:`canvas_cache`; the array is memory-mapped,
    so worker processes share the page cache instead of copying pixels (a pickled
    instance reopens the file rather than carrying the pixels along).

    Args:
        dataset: the ``ImageFolder`` to cache (e.g. ``build_datasets(...).train_plain``).
        canvas: side of the square canvas in pixels.
        cache_dir: see :func:`canvas_cache`.
        progress: show a progress bar while decoding.
        workers: decoding threads.

    Attributes:
        classes, class_to_idx, samples, targets: those of ``dataset``.
        path: the cache file.
    """

    def __init__(
        self,
        dataset: Any,
        canvas: int,
        cache_dir: str | os.PathLike | None = None,
        *,
        progress: bool = True,
        workers: int | None = None,
    ) -> None:
        self.canvas = int(canvas)
        self.root = Path(dataset.root)
        self.classes = list(dataset.classes)
        self.class_to_idx = dict(dataset.class_to_idx)
        self.samples = list(dataset.samples)
        self.targets = [t for _, t in self.samples]
        self._array: np.memmap | None = canvas_cache(
            dataset, canvas, cache_dir, progress=progress, workers=workers
        )
        self.path = Path(self._array.filename)

    @property
    def array(self) -> np.memmap:
        """The memory-mapped ``(N, 3, C, C)`` uint8 pixels."""
        if self._array is None:
            self._array = _open(self.path, (len(self.samples), 3, self.canvas, self.canvas))
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # reopen the file in the other process

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Canvas ``index`` as a fresh ``(3, C, C)`` uint8 tensor, and its label."""
        return torch.from_numpy(np.array(self.array[index])), self.targets[index]


# ----------------------------------------------------------------------------- batched views


class WithSeeds(Dataset):
    """``dataset[(index, seed)] -> (sample, label, seed)``: hand the sampler's seeds to the collate.

    :class:`~dino_nb.loader.TrainSampler` yields ``(index, seed)`` pairs;
    :class:`~dino_nb.loader.SeededDataset` spends the seed on a per-image augmentation,
    this keeps it for :class:`MultiCropCollate`, which augments the whole batch at once.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any, int]:
        index, seed = key
        sample, target = self.dataset[index]
        return sample, target, seed


def batch_seed(seeds: Sequence[int]) -> int:
    """One 63-bit seed from a batch's per-sample seeds (their order counts)."""
    state = np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class MultiCropCollate:
    """Collate ``(canvas, label, seed)`` samples into multi-crop views, on the CPU, batched.

    Stacks the canvases and draws every view with
    :class:`~dino_nb.fast.crops.GPUMultiCrop` (same settings as ``augmentation``, the
    same distribution of views as its GPU use), seeded with :func:`batch_seed`: the same
    batch gives the same views in any process, another batch other views. Picklable, so
    it runs in ``DataLoader`` workers, where torch uses one thread.

    Args:
        augmentation: the multi-crop settings, e.g. the run's
            :class:`~dino_nb.augment.DataAugmentation`. Its ``normalize`` decides the output,
            as for :func:`~dino_nb.loader.collate_crops` on the PIL path: ``False`` gives uint8
            crops (normalise them on the device with
            :func:`~dino_nb.augment.normalize_uint8`), ``True`` normalised float32 crops.
    """

    def __init__(self, augmentation: MultiCropSettings) -> None:
        self.normalize = bool(augmentation.normalize)
        self.multicrop = GPUMultiCrop(
            augmentation.global_crops_scale,
            augmentation.local_crops_scale,
            augmentation.n_local_crops,
            augmentation.global_size,
            augmentation.local_size,
            normalize=self.normalize,
            blur_sigma=augmentation.blur_sigma,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.multicrop!r})"

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, int, int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Views of a batch.

        Args:
            batch: ``B`` samples ``(canvas (3, C, C) uint8, label, seed)`` from :class:`WithSeeds`.

        Returns:
            ``([global 1, global 2, local 1, ...], labels (B,))``, globals ``(B, 3, size, size)``,
            locals ``(B, 3, local_size, local_size)``; uint8, or normalised float32.
        """
        if not batch or len(batch[0]) != 3:
            raise ValueError(
                "MultiCropCollate needs (canvas, label, seed) samples: wrap the dataset in "
                "WithSeeds and draw it with TrainSampler"
            )
        images = torch.stack([s[0] for s in batch])  # (B, 3, C, C) uint8
        labels = torch.tensor([s[1] for s in batch])  # (B,)
        generator = torch.Generator().manual_seed(batch_seed([s[2] for s in batch]))
        crops = self.multicrop(images, generator)  # n_crops x (B, 3, s, s) float
        if not self.normalize:  # [0, 1] -> uint8, as DataAugmentation(normalize=False) gives
            crops = [c.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8) for c in crops]
        return crops, labels
