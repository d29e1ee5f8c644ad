"""Datasets and loaders: find ImageNette (or use the built-in dataset), open it robustly, load it.

Three jobs, in the order a run needs them:

1. **Find** a dataset: :func:`find_imagenette` looks at an explicit path, ``$DINO_NB_DATA``,
   the checkout's ``data/``, Kaggle's ``/kaggle/input`` and Colab's usual places
   (downloading is :mod:`dino_nb.download`'s job).
2. **Open** it: :func:`build_datasets` turns ``--data`` into three ``ImageFolder`` views of
   one dataset (multi-crop train, plain train, plain val). Every image becomes RGB
   (ImageNette holds grayscale and CMYK JPEGs); unreadable files are found by one cheap
   scan and skipped with a single warning that lists them (fatal with ``strict=True``);
   layout problems (no class folders, an empty class, train and val with different
   classes) raise one error that names them.
3. **Load** it: :func:`make_loader` with the project's ``DataLoader`` options,
   :func:`collate_crops` for multi-crop batches, and :func:`projector_subset`, a small,
   fixed, class-balanced validation subset for TensorBoard's projector.

``python -m dino_nb.data --find`` and ``--download 320px`` expose 1. on the command line.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import warnings
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
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
from .shapes import default_data_dir, ensure_builtin_dataset

#: ``--data`` value that selects the generated dataset.
BUILTIN = "builtin"
#: ``--data`` value that means "find ImageNette" (see :func:`find_imagenette`).
IMAGENETTE = "imagenette"
#: Environment variable naming the folder that holds datasets.
ENV_VAR = "DINO_NB_DATA"
#: How deep below each search root :func:`find_imagenette` looks (root itself is depth 0).
SEARCH_DEPTH = 3
#: At most this many folders are listed per search root (a big Google Drive stays quick).
_MAX_DIRS_PER_ROOT = 2000
#: Bytes at the end of a JPEG searched for its end-of-image marker.
_JPEG_TAIL = 1024
#: Consecutive unreadable files a dataset steps over at load time before giving up.
_MAX_FALLBACK = 16


class DataWarning(UserWarning):
    """A problem with the data that training can survive (e.g. skipped unreadable images)."""


# --------------------------------------------------------------------------- labels


@functools.lru_cache(maxsize=1)
def _labels() -> dict[str, str]:
    text = resources.files("dino_nb").joinpath("imagenette_labels.json").read_text(encoding="utf-8")
    return json.loads(text)


def imagenette_labels() -> dict[str, str]:
    """The ten ImageNette class ids (WordNet ids) and their human names.

    Read from ``dino_nb/imagenette_labels.json``, shipped with the package (the copy in the
    checkout's ``data/`` is identical; a test checks it).

    Example:
        >>> imagenette_labels()["n01440764"]
        'tench'
    """
    return dict(_labels())


def class_names(classes: Iterable[str]) -> list[str]:
    """Human names for class folder names: ImageNette ids get their label, others stay as they are."""
    labels = _labels()
    return [labels.get(c, c) for c in classes]


# --------------------------------------------------------------------------- finding ImageNette


def _subdirs(folder: Path) -> list[str]:
    """Names of the visible subfolders of ``folder`` (hidden ones, like ``.ipynb_checkpoints``, skipped)."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def is_imagenette_root(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds ``train/`` and ``val/``, each with exactly the ten ImageNette class ids."""
    folder = Path(folder)
    wnids = sorted(_labels())
    return all(_subdirs(folder / split) == wnids for split in ("train", "val"))


def _search(root: Path, max_depth: int) -> Path | None:
    """Breadth-first search for an ImageNette root at most ``max_depth`` folders below ``root``.

    Within one depth, folder names are visited in sorted order, except that a name with
    ``320`` in it comes first (the default download). Class and split folders are not
    entered, so a found dataset's 13k files are never listed.
    """
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    visited = 0
    while queue and visited < _MAX_DIRS_PER_ROOT:
        folder, depth = queue.popleft()
        visited += 1
        if is_imagenette_root(folder):
            return folder
        if depth == max_depth:
            continue
        names = _subdirs(folder)
        names.sort(key=lambda n: ("320" not in n, n))
        queue.extend(
            (folder / n, depth + 1) for n in names if n not in ("train", "val") and not _is_wnid(n)
        )
    return None


def _is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def default_search_roots() -> list[Path]:
    """Where :func:`find_imagenette` looks when given no path, in order.

    ``$DINO_NB_DATA``, the checkout's ``data/`` (or ``./data``), ``./data``, Kaggle's
    ``/kaggle/input`` (attached datasets) and ``/kaggle/working``, Colab's ``/content``,
    ``/content/data`` and ``/content/drive/MyDrive`` (a mounted Google Drive).
    """
    roots: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots += [
        default_data_dir(),
        Path.cwd() / "data",
        Path("/kaggle/input"),
        Path("/kaggle/working"),
        Path("/content"),
        Path("/content/data"),
        Path("/content/drive/MyDrive"),
    ]
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def _not_found_message(looked: Sequence[Path], max_depth: int) -> str:
    places = ", ".join(f"{p}{'' if p.is_dir() else ' (missing)'}" for p in looked)
    return (
        f"ImageNette not found (looked for train/ and val/ with the 10 ImageNette class folders, up to "
        f"{max_depth} folders deep, in: {places}). Download it with "
        f"`python -m dino_nb.data --download 320px` (about 342 MB), set ${ENV_VAR} to the folder that holds it, "
        "pass --data PATH, or on Kaggle attach an ImageNette dataset to the notebook"
    )


def find_imagenette(
    path: str | os.PathLike | None = None,
    *,
    search_roots: Sequence[str | os.PathLike] | None = None,
    max_depth: int = SEARCH_DEPTH,
) -> Path:
    """Find an ImageNette folder (one holding ``train/`` and ``val/`` with the ten class ids).

    Accepts the folder itself (``.../imagenette2-320``) or any folder above it, up to
    ``max_depth`` levels (Kaggle nests datasets like
    ``/kaggle/input/imagenette/imagenette2-320/imagenette2-320``). Hidden folders (such as a
    half-finished extraction) are never entered.

    Args:
        path: an explicit place. When given, only it is searched: a wrong path is an error,
            not a reason to train on some other copy.
        search_roots: where to look when ``path`` is ``None``, in order; default
            :func:`default_search_roots` (``$DINO_NB_DATA``, ``data/``, Kaggle, Colab).
        max_depth: how many folder levels below each root to search.

    Returns:
        The ImageNette root (holding ``train/`` and ``val/``).

    Raises:
        FileNotFoundError: naming every place it looked and how to download the dataset.
    """
    if path is not None:
        roots = [Path(path).expanduser()]
    elif search_roots is not None:
        roots = [Path(r).expanduser() for r in search_roots]
    else:
        roots = default_search_roots()
    for root in roots:
        if root.is_dir():
            found = _search(root, max_depth)
            if found is not None:
                return found
    raise FileNotFoundError(_not_found_message(roots, max_depth))


def imagenette_available() -> bool:
    """Whether :func:`find_imagenette` finds ImageNette in the usual places.

    What ``--preset auto`` and the notebooks' ``gpu`` profile ask before choosing the
    ImageNette-sized run over the small built-in one.
    """
    try:
        find_imagenette()
    except FileNotFoundError:
        return False
    return True


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


def resolve_data_root(data: str | os.PathLike | None) -> Path:
    """Turn a ``--data`` value into a folder: one holding ``train/`` and ``val/``, or any other.

    ``None`` or ``"builtin"`` selects the built-in dataset (generated on first use);
    ``"imagenette"`` runs :func:`find_imagenette`; a path is used as it is, or, when it has
    no ``train/`` and ``val/``, searched for ImageNette below it; when none is found, the
    folder itself is returned and :func:`build_datasets` opens it unlabelled.

    Raises:
        FileNotFoundError: when the folder is missing, has only one of ``train``/``val``,
            or ImageNette is not found (the message says where it looked and how to download).
    """
    if data is None or str(data) == BUILTIN:
        return ensure_builtin_dataset()
    if str(data) == IMAGENETTE:
        return find_imagenette()
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if not missing:
        return root
    nested = _search(root, SEARCH_DEPTH)
    if nested is not None:
        return nested
    if len(missing) == 1:  # half a labelled layout is a mistake, not a folder of photos
        raise FileNotFoundError(f"data folder {root} has no {missing[0]} subfolder")
    return root  # any other folder: all its images, unlabelled (see ImageFiles)


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


def _drop_unreadable(
    root: Path, splits: Sequence[RobustImageFolder], strict: bool
) -> dict[str, str]:
    """Scan every file once; skip the bad ones with one warning, or raise under ``strict``."""
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
        unreadable = _drop_unreadable(root, [files], strict) if scan else {}
        rel = files.relative_paths
        train_plain = ImageFiles(
            root, plain, strict=strict, files=[f for f in rel if f not in aside]
        )
        val_plain = ImageFiles(root, plain, strict=strict, files=[f for f in rel if f in aside])
        return DatasetBundle(
            root, train_plain.with_transform(train_transform), train_plain, val_plain, unreadable
        )
    unreadable = _drop_unreadable(root, [train_plain, val_plain], strict) if scan else {}
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
