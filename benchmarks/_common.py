"""Shared helpers of the benchmark scripts: images to read, alternating timing, tables."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# the benchmarks import the package from the checkout and the baseline from this folder
for p in (str(REPO), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

#: Real ImageNette photos shipped beside the checkout (absent in a fresh clone).
MINI = REPO.parent / "shared" / "data" / "imagenette-mini"


def image_folder_root(
    n_generated: int = 64, size: tuple[int, int] = (320, 240), generated: bool = False
) -> tuple[Path, str]:
    """A folder in ImageFolder layout (``train/<class>/*.JPEG``, ``val/...``) of real JPEGs.

    ``../shared/data/imagenette-mini`` when present (and ``generated`` is false), else
    ``n_generated`` smooth random JPEGs (``size`` = width, height) written once to a
    temporary folder.

    Returns:
        ``(root, description)``.
    """
    if not generated and (MINI / "train").is_dir() and (MINI / "val").is_dir():
        return MINI, f"imagenette-mini ({MINI})"
    root = Path(tempfile.gettempdir()) / f"dino_nb_bench_jpegs_{n_generated}_{size[0]}x{size[1]}"
    if not (root / "val").is_dir():
        rng = np.random.default_rng(0)
        for split, n in (("train", n_generated), ("val", max(n_generated // 4, 4))):
            for i in range(n):
                folder = root / split / f"class{i % 4}"
                folder.mkdir(parents=True, exist_ok=True)
                _photo(rng, size).save(folder / f"img{i:04d}.JPEG", quality=90)
    return root, f"{n_generated} generated {size[0]}x{size[1]} JPEGs in {root}"


def _photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth random colour field plus a little noise: a photo-like spectrum (``size`` = w, h)."""
    low = rng.integers(0, 256, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize(size, Image.BICUBIC)
    noise = rng.integers(-12, 13, size=(size[1], size[0], 3))
    return Image.fromarray(
        np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    )


def generated_photos(
    n_train: int,
    n_val: int,
    size: tuple[int, int] = (427, 320),
    n_classes: int = 4,
    n_distinct: int = 64,
) -> Path:
    """An ImageFolder tree (``train/<class>/*.JPEG``, ``val/...``) of many generated JPEGs, written once.

    For runs that must not reach an epoch's end: thousands of files, ready in about a second.
    Only ``n_distinct`` JPEGs are encoded (photo-like, as :func:`image_folder_root` makes
    them); every other file is a hard link to one of them (a copy where links fail). The
    loader opens and decodes every file all the same, so reading the set costs what reading
    as many different photos of that size would. The default size is imagenette2-320's
    (shorter side 320, 4:3). A ``.complete`` marker, written last, tells a finished folder
    from one a killed run left half-written.

    Returns:
        the root folder (under the temporary directory; its name holds the counts and size).
    """
    root = Path(tempfile.gettempdir()) / f"dino_nb_photos_{n_train}_{n_val}_{size[0]}x{size[1]}"
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    sources: list[Path] = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"class{i % n_classes}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"img{i:05d}.JPEG"
            if len(sources) < n_distinct:
                _photo(rng, size).save(path, quality=90)
                sources.append(path)
                continue
            source = sources[i % len(sources)]
            try:
                os.link(source, path)
            except OSError:  # a file system without hard links
                shutil.copyfile(source, path)
    done.write_text(f"{n_train} train + {n_val} val, {len(sources)} distinct\n")
    return root


def jpeg_paths(root: Path, split: str = "train") -> list[str]:
    """Sorted JPEG paths under ``root/split``."""
    paths = sorted(
        str(p) for p in (root / split).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")
    )
    if not paths:
        raise FileNotFoundError(f"no images under {root / split}")
    return paths


def set_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` (and interop threads when still allowed); returns n."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # already set once in this process
    return n


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work so that wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved (a, b, a, b, ...), in seconds.

    Interleaving spreads background load and thermal drift evenly over the contenders,
    so their ratio is fairer than from two separate runs.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """Median over runs of ``slow[i] / fast[i]``: each pair ran back to back, under the same load."""
    return median([s / f for s, f in zip(slow, fast, strict=True)])


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(xs))


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a small Markdown table (pastes into the README as it is)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}\n")
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if j == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")
    sys.stdout.flush()


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c != c:  # NaN
            return "n/a"
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def machine_line(threads: int) -> str:
    """One line naming the machine, torch version, thread count and current load."""
    try:
        load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load n/a"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}; torch {torch.__version__}; "
        f"torch threads {threads}; {load}"
    )
