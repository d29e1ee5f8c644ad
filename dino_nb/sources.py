"""Where the images come from: the built-in shapes (generated), ImageNette (found on disk), a folder.

:func:`resolve_data_root` turns ``--data`` into a folder: ``builtin`` (the default) is the
dataset generated here, ``imagenette`` is found by :func:`find_imagenette` (an explicit path,
``$DINO_NB_DATA``, the checkout's ``data/``, Kaggle's ``/kaggle/input``, Colab's usual places;
downloading is :mod:`dino_nb.tools.download`'s job), anything else is a folder.

The built-in dataset: ten classes of generated shapes and textures, no download needed.

Each class is defined by shape, texture or layout, never by colour: every image takes its
object and background colours from the same four palettes (with a little jitter), in a
random pose, size and phase. Colour therefore carries almost no information about the
class, which matters for DINO: self-distillation learns whatever the views of one image
share, and when each image had colours of its own (version 1 of this dataset), a short
run learned to group images by colour and the kNN accuracy did not move. With shared
palettes the features still group images by palette (notebook 05's maps), but inside a
palette only shape and texture tell the classes apart, and a short CPU run shows kNN
accuracy rising.

Images are generated deterministically from a seed and written once in ``ImageFolder``
layout (``<root>/{train,val}/<class>/<index>.png``); a marker file says the folder is
complete, and the folder is written to a temporary name first and renamed into place,
so an interrupted generation never leaves a half dataset that looks complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "h_stripes",
    "v_stripes",
    "checker",
    "dots",
)
VERSION = 2
IMAGE_SIZE = 64
N_TRAIN_PER_CLASS = 100
N_VAL_PER_CLASS = 20
SEED = 0
DIRNAME = f"builtin-shapes-v{VERSION}"
_MARKER = ".complete"

Color = tuple[int, int, int]


#: (foreground, background) pairs shared by all classes: dark on light, light on dark,
#: red on yellow, blue on light blue.
PALETTES: tuple[tuple[Color, Color], ...] = (
    ((20, 20, 20), (235, 235, 235)),
    ((235, 235, 235), (20, 20, 20)),
    ((200, 40, 40), (240, 220, 120)),
    ((30, 60, 160), (150, 210, 230)),
)


def _colors(rng: np.random.Generator) -> tuple[Color, Color]:
    """A palette drawn at random, foreground and background shifted apart by a small jitter."""
    fg, bg = PALETTES[int(rng.integers(len(PALETTES)))]
    jitter = rng.integers(-15, 16, 3)
    fg_j = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(fg, jitter, strict=True))
    bg_j = tuple(int(np.clip(c - d, 0, 255)) for c, d in zip(bg, jitter, strict=True))
    return fg_j, bg_j  # type: ignore[return-value]


def palette_of(image: np.ndarray | Image.Image) -> int:
    """Which of :data:`PALETTES` a built-in image was drawn in (its index; 0 for 0 and 1).

    Every pixel is foreground or background (plus noise, jitter and blur), so the palette
    whose two colours lie nearest to the pixels, on average, is the one it was drawn in.
    Palettes 0 and 1 share their two colours (dark on light, light on dark) and count as
    one colour scheme, 0: a texture in either looks the same.

    Args:
        image: a PIL image, or an ``(H, W, 3)`` array (uint8, or float in [0, 1]).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    pixels = pixels.astype(np.float32).reshape(-1, 3)  # (n_pixels, 3)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    pairs = np.asarray(PALETTES, dtype=np.float32)  # (n_palettes, 2, 3)
    gaps = np.linalg.norm(
        pixels[None, None] - pairs[:, :, None], axis=-1
    )  # (n_palettes, 2, n_pixels)
    return int(gaps.min(axis=1).mean(axis=1).argmin())


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * i / n),
            cy + r * math.sin(angle + 2 * math.pi * i / n),
        )
        for i, r in enumerate(radii)
    ]


def _shape(kind: str) -> Callable[[ImageDraw.ImageDraw, np.random.Generator, Color, int], None]:
    def draw(d: ImageDraw.ImageDraw, rng: np.random.Generator, fg: Color, size: int) -> None:
        r = size * rng.uniform(0.22, 0.36)
        cx, cy = rng.uniform(r, size - r, 2)
        angle = rng.uniform(0, 2 * math.pi)
        if kind == "disc":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif kind == "ring":
            w = max(2.0, r * 0.35)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=int(w))
        elif kind == "square":
            d.polygon(_polygon(cx, cy, [r] * 4, angle), fill=fg)
        elif kind == "triangle":
            d.polygon(_polygon(cx, cy, [r] * 3, angle), fill=fg)
        elif kind == "star":
            d.polygon(_polygon(cx, cy, [r, r * 0.4] * 5, angle), fill=fg)
        elif kind == "cross":
            w = r * 0.35
            for a in (angle, angle + math.pi / 2):
                dx, dy = math.cos(a), math.sin(a)
                px, py = -dy * w, dx * w
                d.polygon(
                    [
                        (cx - dx * r + px, cy - dy * r + py),
                        (cx + dx * r + px, cy + dy * r + py),
                        (cx + dx * r - px, cy + dy * r - py),
                        (cx - dx * r - px, cy - dy * r - py),
                    ],
                    fill=fg,
                )

    return draw


def _texture(kind: str) -> Callable[[ImageDraw.ImageDraw, np.random.Generator, Color, int], None]:
    def draw(d: ImageDraw.ImageDraw, rng: np.random.Generator, fg: Color, size: int) -> None:
        period = int(rng.integers(8, 15))
        offset = int(rng.integers(0, period))
        if kind == "h_stripes":
            for y in range(-period + offset, size, period):
                d.rectangle([0, y, size, y + period // 2 - 1], fill=fg)
        elif kind == "v_stripes":
            for x in range(-period + offset, size, period):
                d.rectangle([x, 0, x + period // 2 - 1, size], fill=fg)
        elif kind == "checker":
            for i, y in enumerate(range(-period + offset, size, period)):
                for j, x in enumerate(range(-period + offset, size, period)):
                    if (i + j) % 2 == 0:
                        d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
        elif kind == "dots":
            rad = period * 0.28
            for y in range(-period + offset, size + period, period):
                for x in range(-period + offset, size + period, period):
                    d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fg)

    return draw


_DRAW = {
    name: (
        _texture(name) if name in {"h_stripes", "v_stripes", "checker", "dots"} else _shape(name)
    )
    for name in CLASSES
}


def render(class_index: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one image of class ``CLASSES[class_index]`` with random colours, pose and noise."""
    fg, bg = _colors(rng)
    img = Image.new("RGB", (size, size), bg)
    _DRAW[CLASSES[class_index]](ImageDraw.Draw(img), rng, fg, size)
    noise = rng.normal(0, 12, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(radius=0.5))


def generate(
    root: Path, n_train: int = N_TRAIN_PER_CLASS, n_val: int = N_VAL_PER_CLASS, seed: int = SEED
) -> None:
    """Write the dataset under ``root`` (``train/`` and ``val/``), replacing nothing that exists."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                render(c, rng).save(folder / f"{i:04d}.png")


def ensure_builtin_dataset(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the root of the built-in dataset, generating it on first use (about a second).

    Args:
        data_dir: folder that holds datasets; default :func:`default_data_dir`.

    Returns:
        ``<data_dir>/builtin-shapes-v2``, holding ``train/`` and ``val/`` in ImageFolder layout.
    """
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    root = base / DIRNAME
    if (root / _MARKER).exists():
        return root
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}-", dir=base))
    try:
        generate(tmp)
        (tmp / _MARKER).write_text(f"version {VERSION} seed {SEED}\n")
        if root.exists():  # an incomplete leftover without the marker
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (root / _MARKER).exists():  # another process won the race
            return root
        raise
    return root


def default_data_dir() -> Path:
    """Where datasets live: ``$DINO_NB_DATA``, else the checkout's ``data/``, else ``./data``."""
    env = os.environ.get("DINO_NB_DATA")
    if env:
        return Path(env).expanduser()
    checkout_data = Path(__file__).resolve().parent.parent / "data"
    if checkout_data.is_dir() and os.access(checkout_data, os.W_OK):
        return checkout_data
    return Path.cwd() / "data"


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
