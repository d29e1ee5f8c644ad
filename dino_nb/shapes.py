"""The built-in dataset: ten classes of generated shapes and textures, no download needed.

Each class is defined by shape, texture or layout, never by colour: every image takes its
object and background colours from the same four palettes (with a little jitter), in a
random pose, size and phase. Colour therefore carries almost no information about the
image, which matters for DINO: self-distillation learns whatever the views of one image
share, and when each image had colours of its own (version 1 of this dataset), a short
run learned to group images by colour and the kNN accuracy did not move. With shared
palettes the views share their shape and little else, and a short CPU run shows kNN
accuracy rising, which is the point of the main job.

Images are generated deterministically from a seed and written once in ``ImageFolder``
layout (``<root>/{train,val}/<class>/<index>.png``); a marker file says the folder is
complete, and the folder is written to a temporary name first and renamed into place,
so an interrupted generation never leaves a half dataset that looks complete.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
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
