"""Datasets: open image folders robustly as the three views a run needs, and small loaders' helpers.

:func:`build_datasets` turns ``--data`` (through :func:`dino_nb.sources.resolve_data_root`)
into three ``ImageFolder`` views of one dataset (multi-crop train, plain train, plain val).
Every image becomes RGB (ImageNette holds grayscale and CMYK JPEGs); unreadable files are
found by one cheap scan and skipped with a single warning that lists them (fatal with
``strict=True``); layout problems (no class folders, an empty class, train and val with
different classes) raise one error that names them. A folder of your own photos without
``train/`` and ``val/`` is one unlabelled class with a fixed 5% held aside
(:class:`ImageFiles`). :func:`projector_subset` is a small, fixed, class-balanced
validation subset for TensorBoard's projector.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.vision import StandardTransform

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .sources import (
    _subdirs,
    class_names,
    resolve_data_root,
)

#: Bytes at the end of a JPEG searched for its end-of-image marker.
_JPEG_TAIL = 1024
#: Consecutive unreadable files a dataset steps over at load time before giving up.
_MAX_FALLBACK = 16


class DataWarning(UserWarning):
    """A problem with the data that training can survive (e.g. skipped unreadable images)."""


# --------------------------------------------------------------------------- opening images


def rgb_loader(path: str) -> Image.Image:
    """Open an image file and convert it to RGB (ImageNette holds grayscale and CMYK JPEGs)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if (
            img.mode == "P" and "transparency" in img.info
        ):  # avoids PIL's palette-transparency warning
            img = img.convert("RGBA")
        return img.convert("RGB")


def check_image_file(path: str | os.PathLike) -> str | None:
    """Why an image file is unreadable, or ``None`` when it looks fine; cheap, no full decode.

    Reads the header (``PIL.Image.open``) and runs ``verify()``, which walks PNG chunks and
    checks their CRCs; for a JPEG it also looks for the end-of-image marker in the last
    kilobyte, which catches truncated downloads. No pixels are decoded: about 0.07 ms per
    file on a warm local disk (13k ImageNette files in about a second), where decoding them
    all would take tens of seconds. A file that passes but still fails to decode is caught
    when it is loaded (see :class:`RobustImageFolder`).
    """
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(err).__name__}: {err}"
    if fmt == "JPEG":
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _JPEG_TAIL))
            if b"\xff\xd9" not in f.read():  # entropy-coded data never holds FF D9 (byte stuffing)
                return "truncated JPEG (no end-of-image marker)"
    return None


def find_unreadable(paths: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """Check many image files with :func:`check_image_file`; return ``{path: reason}`` of the bad ones.

    Args:
        paths: image files.
        workers: threads to use; default ``min(8, 2 * cpu_count)``, and one thread for fewer
            than 64 files. Threads pay off on slow or network disks (Kaggle inputs, a
            mounted Drive), where the check waits on reads.
    """
    if workers is None:
        workers = 1 if len(paths) < 64 else min(8, 2 * (os.cpu_count() or 1))
    if workers <= 1:
        reasons = [check_image_file(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check_image_file, paths))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


def _has_image(folder: Path) -> bool:
    for _dirpath, _dirs, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


class RobustImageFolder(ImageFolder):
    """An ``ImageFolder`` that opens every image as RGB and survives unreadable files.

    Differences from torchvision's ``ImageFolder``:

    - hidden folders (``.ipynb_checkpoints``, ...) are not classes;
    - a folder with no class folders, or a class folder with no images, raises one
      ``FileNotFoundError`` that names them (torchvision's message is cryptic);
    - a file that fails to load is, with ``strict=False``, reported in a :class:`DataWarning`
      and replaced by the next sample (so a batch never dies on one bad file); with
      ``strict=True`` it raises ``OSError`` naming the file.

    Args:
        root: folder holding one subfolder per class.
        transform: applied to the RGB ``PIL.Image``.
        strict: make unreadable files fatal at load time.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        strict: bool = False,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        classes = _subdirs(root)
        if not classes:
            raise FileNotFoundError(
                f"{root} holds no class folders; expected {root}/<class>/<image>.jpg"
            )
        empty = [c for c in classes if not _has_image(root / c)]
        if empty:
            raise FileNotFoundError(
                f"{root}: {len(empty)} class folder(s) hold no images: {', '.join(empty)} "
                f"(image files end in {', '.join(IMG_EXTENSIONS)})"
            )
        super().__init__(str(root), transform=transform, loader=rgb_loader)
        self.strict = strict

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """Class names are the visible subfolders, sorted; hidden folders are skipped."""
        classes = _subdirs(Path(directory))
        return classes, {c: i for i, c in enumerate(classes)}

    def remove(self, paths: Collection[str]) -> None:
        """Drop the samples whose file is in ``paths`` (e.g. found unreadable by a scan)."""
        paths = set(paths)
        self.samples = [s for s in self.samples if s[0] not in paths]
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> RobustImageFolder:
        """A view of the same files with another transform, without listing the folder again."""
        other = copy.copy(self)
        other.transform = transform
        other.transforms = StandardTransform(transform, self.target_transform)
        return other

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Sample ``index`` (an RGB image through the transform) and its class index."""
        for _ in range(_MAX_FALLBACK):
            path, target = self.samples[index]
            try:
                sample = self.loader(path)
            except Exception as err:  # any decoder failure means this file is unusable
                if self.strict:
                    raise OSError(f"cannot read image {path}: {err}") from err
                warnings.warn(f"skipping unreadable image {path}: {err}", DataWarning, stacklevel=2)
                index = (index + 1) % len(self.samples)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise OSError(
            f"{_MAX_FALLBACK} unreadable images in a row near {path}; is the dataset damaged?"
        )


#: Share of an unlabelled folder held aside for the label-free score (at least a few images).
HOLD_OUT_FRACTION = 0.05
#: At most this many held-aside images: the score is cheap at any folder size.
HOLD_OUT_MAX = 500
#: At least this many held-aside images (fewer in folders under twice that size).
HOLD_OUT_MIN = 16


def list_images(root: str | os.PathLike) -> list[str]:
    """Every image file below ``root``, at any depth, as sorted relative POSIX paths.

    Hidden files and folders (``.ipynb_checkpoints``, ``.dino_nb_cache``) are skipped;
    symbolic links to folders are followed. The order is the sorted relative path, the
    same on every machine.
    """
    root = Path(root)
    found: list[str] = []
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found += [
            (rel / f).as_posix()
            for f in files
            if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)
        ]
    return sorted(found)


def held_out(paths: Sequence[str]) -> set[str]:
    """The relative paths held aside from training: the smallest SHA-1 hashes of the paths.

    ``HOLD_OUT_FRACTION`` of the files (``HOLD_OUT_MIN`` to ``HOLD_OUT_MAX``, never more
    than half). A file's fate depends on its name only, not on listing order or the
    machine, so a growing folder keeps most of its held-aside images.
    """
    n = len(paths)
    k = min(HOLD_OUT_MAX, n // 2, max(round(HOLD_OUT_FRACTION * n), HOLD_OUT_MIN))
    ranked = sorted(paths, key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    return set(ranked[:k])


class ImageFiles(RobustImageFolder):
    """Every image below a folder, at any depth, without labels: ``dataset[i] -> (image, -1)``.

    The unlabelled counterpart of :class:`RobustImageFolder` (same ``samples``, ``targets``,
    ``remove``, ``with_transform``, RGB loading and unreadable-file handling), so the
    training pipeline (sampler, pixel cache, augmentation) takes it unchanged. ``classes``
    is empty and every target is ``-1``.

    Args:
        root: the folder; sub-folders are only nesting, never classes.
        transform: applied to the RGB ``PIL.Image``.
        strict: make unreadable files fatal at load time.
        files: relative paths to use (default: all of :func:`list_images`).

    Raises:
        FileNotFoundError: the folder is missing or holds no image files.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        strict: bool = False,
        files: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        files = list_images(root) if files is None else list(files)
        if not files:
            raise FileNotFoundError(
                f"{root} holds no images (looked in every subfolder for files ending in "
                f"{', '.join(IMG_EXTENSIONS)})"
            )
        self.root = str(root)
        self.transform, self.target_transform = transform, None
        self.transforms = StandardTransform(transform, None)
        self.loader, self.strict = rgb_loader, strict
        self.classes: list[str] = []
        self.class_to_idx: dict[str, int] = {}
        self.samples = [(str(root / f), -1) for f in files]
        self.imgs = self.samples
        self.targets = [-1] * len(self.samples)

    @property
    def relative_paths(self) -> list[str]:
        """The files of the samples relative to ``root``, in sample order (POSIX separators)."""
        return [Path(p).relative_to(self.root).as_posix() for p, _ in self.samples]


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    """Raise ``ValueError`` naming the classes that only one of train and val holds."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"train and val hold different classes: only in train {only_train}, only in val {only_val}"
        )


# --------------------------------------------------------------------------- transforms


def plain_transform(size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation transform: resize the short side, centre crop, then normalise.

    The resize keeps the usual 256/224 ratio (a 224 crop from a 256 image). The tutorial
    normalised first and resized the normalised tensor afterwards; resizing first is the
    standard order and keeps the interpolation on pixel values. Images smaller than
    ``size`` are scaled up by the resize, so any image works.
    """
    return transforms.Compose(
        [
            transforms.Resize(
                int(round(size * 256 / 224)), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------- datasets


class DatasetBundle:
    """The three views of one dataset that training needs.

    Attributes:
        root: folder holding ``train/`` and ``val/``.
        train_aug: training images through the multi-crop augmentation.
        train_plain: training images through :func:`plain_transform` (kNN memory bank).
        val_plain: validation images through :func:`plain_transform`.
        classes: class folder names, the same for all three (empty when unlabelled).
        names: human names of the classes (ImageNette ids become "tench", ...).
        unreadable: ``{path: reason}`` of the files skipped because they could not be read.
        labelled: ``train/`` and ``val/`` with class folders; ``False`` for a folder of
            images (:class:`ImageFiles`), whose ``val_plain`` holds the images held aside
            from training (:func:`held_out`) and whose targets are all ``-1``.
    """

    def __init__(
        self,
        root: Path,
        train_aug: ImageFolder,
        train_plain: ImageFolder,
        val_plain: ImageFolder,
        unreadable: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.train_aug = train_aug
        self.train_plain = train_plain
        self.val_plain = val_plain
        self.classes = list(train_plain.classes)
        self.names = class_names(self.classes)
        self.unreadable = dict(unreadable or {})
        self.labelled = bool(self.classes)


def drop_unreadable(
    root: Path, splits: Sequence[RobustImageFolder], strict: bool
) -> dict[str, str]:
    """Scan every file once; skip the bad ones with one warning, or raise under ``strict``.

    Used for training data here and for the folders ``python -m dino_nb.embed`` embeds.
    """
    bad: dict[str, str] = {}
    for ds in splits:
        bad.update(find_unreadable([path for path, _ in ds.samples]))
    if not bad:
        return bad
    listing = "\n".join(f"  {path}: {reason}" for path, reason in sorted(bad.items()))
    if strict:
        raise ValueError(f"{len(bad)} unreadable image(s) under {root} (strict mode):\n{listing}")
    warnings.warn(
        f"skipping {len(bad)} unreadable image(s) under {root}:\n{listing}",
        DataWarning,
        stacklevel=3,
    )
    for ds in splits:
        ds.remove(bad)
        if not ds.classes:  # unlabelled: only an empty folder is fatal
            if not ds.samples:
                raise FileNotFoundError(f"{ds.root}: no readable images left")
            continue
        counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
        empty = [c for c, n in zip(ds.classes, counts, strict=True) if n == 0]
        if empty:
            raise FileNotFoundError(
                f"{ds.root}: no readable images left in class folder(s) {', '.join(empty)}"
            )
    return bad


def build_datasets(
    data: str | os.PathLike | None,
    train_transform: Callable[[Image.Image], Any],
    eval_size: int,
    strict: bool = False,
    *,
    scan: bool = True,
) -> DatasetBundle:
    """Open ``train/`` and ``val/`` of a dataset, or a folder of images, for training and evaluation.

    A folder without ``train/`` and ``val/`` is opened unlabelled: every image below it
    (:class:`ImageFiles`), minus the few held aside by :func:`held_out` as ``val_plain``.

    Checks, in order of cost: the layout (class folders present, none empty, the same in
    train and val), then every file once with :func:`check_image_file` (a few seconds for
    ImageNette). Unreadable files are skipped with one :class:`DataWarning` that lists them
    all, or raise under ``strict``.

    Args:
        data: ``None``/``"builtin"`` (built-in dataset), ``"imagenette"`` (found with
            :func:`find_imagenette`), or a folder (see :func:`resolve_data_root`).
        train_transform: the multi-crop augmentation.
        eval_size: side of the centre crop for evaluation.
        strict: fail on unreadable images instead of skipping them with a warning.
        scan: check every file up front; with ``False``, bad files are only met (and
            stepped over) when loaded.

    Raises:
        FileNotFoundError: missing data, no class folders, an empty class, or a folder
            without images.
        ValueError: train and val with different classes; unreadable images under ``strict``.
    """
    root = resolve_data_root(data)
    plain = plain_transform(eval_size)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_plain = RobustImageFolder(root / "train", plain, strict=strict)
        val_plain = RobustImageFolder(root / "val", plain, strict=strict)
        check_same_classes(train_plain, val_plain)
    else:  # a folder of images: train on most, hold a few aside for the label-free score
        files = ImageFiles(root, plain, strict=strict)
        aside = held_out(files.relative_paths)
        unreadable = drop_unreadable(root, [files], strict) if scan else {}
        rel = files.relative_paths
        train_plain = ImageFiles(
            root, plain, strict=strict, files=[f for f in rel if f not in aside]
        )
        val_plain = ImageFiles(root, plain, strict=strict, files=[f for f in rel if f in aside])
        return DatasetBundle(
            root, train_plain.with_transform(train_transform), train_plain, val_plain, unreadable
        )
    unreadable = drop_unreadable(root, [train_plain, val_plain], strict) if scan else {}
    train_aug = train_plain.with_transform(train_transform)
    return DatasetBundle(root, train_aug, train_plain, val_plain, unreadable)


# --------------------------------------------------------------------------- loaders


def projector_subset(dataset: Dataset, n_per_class: int) -> Subset:
    """A fixed, class-balanced subset: ``n_per_class`` samples per class, evenly spread.

    Deterministic (no randomness: the same files on every call), so the projector shows
    the same points at every evaluation. A class with fewer samples gives all it has.

    Args:
        dataset: a dataset with ``targets`` (an ``ImageFolder``).
        n_per_class: samples to take from each class, at least 1.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(
            f"projector_subset needs a dataset with .targets, got {type(dataset).__name__}"
        )
    targets = np.asarray(targets)
    indices: list[int] = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)  # (n_c,)
        k = min(n_per_class, len(members))
        picks = np.linspace(0, len(members) - 1, k).round().astype(np.int64)  # evenly spaced, (k,)
        indices.extend(members[picks].tolist())
    return Subset(dataset, indices)
