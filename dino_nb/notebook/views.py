"""How each view was made: :class:`~dino_nb.augment.DataAugmentation`'s views with their records.

``DataAugmentation`` returns tensors only. Notebook 01 also wants each view's crop box on
the original, the augmentations it drew and the image after each step. :func:`record_views`
replays the pipeline one step at a time with torchvision's functional API, drawing every
random number where the transforms draw it (``RandomResizedCrop.get_params``,
``ColorJitter.get_params``, one ``torch.rand`` per random choice), so under the same torch
seed it gives the same views, pixel for pixel (``tests/test_views.py`` holds it to that).
The figures and counts at the end show why the two global views are corrupted differently
(:func:`global_pairs`, :func:`global_pair_counts`) and what a blur sigma does to small crops
(:func:`blur_comparison`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..augment import (
    BLUR_SIGMA,
    JITTER,
    P_BLUR,
    P_FLIP,
    P_GRAYSCALE,
    P_JITTER,
    P_SOLARIZE,
    RATIO,
    SOLARIZE_THRESHOLD,
    DataAugmentation,
    GaussianBlur,
)
from .figures import class_colors, new_figure, to_hwc

#: The colour-jitter operations in ``ColorJitter``'s order (its random permutation indexes this).
_JITTER_OPS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}
_COLOR_JITTER = T.ColorJitter(*JITTER)  # holds the factor ranges ColorJitter draws from


@dataclass
class View:
    """One augmented view and the record of how it was made.

    Attributes:
        image: the augmented crop, a square RGB PIL image of ``global_size`` or ``local_size`` (not normalised).
        kind: ``"global"`` or ``"local"``.
        box: ``(left, top, right, bottom)`` of the crop in the original image, in pixels.
        flipped: whether the crop was mirrored horizontally.
        jitter: the colour-jitter factors, keyed in the (random) order they were applied;
            ``None`` when jitter was skipped.
        grayscale: whether the view was turned to grayscale.
        blur_sigma: the Gaussian blur sigma, ``None`` when no blur was applied.
        solarized: whether the view was solarized.
        steps: ``[(name, image), ...]`` after each step, with ``record_steps`` (else empty).
    """

    image: Image.Image
    kind: str
    box: tuple[int, int, int, int]
    flipped: bool = False
    jitter: dict[str, float] | None = None
    grayscale: bool = False
    blur_sigma: float | None = None
    solarized: bool = False
    steps: list[tuple[str, Image.Image]] = field(default_factory=list, repr=False)


def record_views(aug: DataAugmentation, img: Image.Image, record_steps: bool = False) -> list[View]:
    """``aug(img)``'s views as PIL images, each with its crop box and augmentations.

    Args:
        aug: the pipeline whose views to make (its normalisation does not matter here).
        img: input image; converted to RGB if needed.
        record_steps: keep the image after each step in ``View.steps`` (costs memory).

    Returns:
        ``[global 1, global 2, local 1, ..., local N]``, equal to ``aug(img)`` drawn from the
        same torch random state.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    p_global1, p_global2, p_local = P_BLUR
    kinds = [("global", p_global1, False), ("global", p_global2, True)]
    kinds += [("local", p_local, False)] * aug.n_local_crops
    return [_record(aug, img, *kind, record_steps) for kind in kinds]


def _record(
    aug: DataAugmentation,
    img: Image.Image,
    kind: str,
    p_blur: float,
    may_solarize: bool,
    record_steps: bool,
) -> View:
    """One view, step by step, with the draws of ``aug``'s transforms in their order."""
    size, scale = (
        (aug.global_size, aug.global_crops_scale)
        if kind == "global"
        else (aug.local_size, aug.local_crops_scale)
    )
    steps: list[tuple[str, Image.Image]] = []

    def step(name: str, x: Image.Image) -> Image.Image:
        if record_steps:
            steps.append((name, x))
        return x

    top, left, h, w = T.RandomResizedCrop.get_params(img, list(scale), list(RATIO))
    x = TF.resized_crop(img, top, left, h, w, [size, size], T.InterpolationMode.BICUBIC)
    view = View(image=step("crop", x), kind=kind, box=(left, top, left + w, top + h))
    if torch.rand(1).item() < P_FLIP:  # RandomHorizontalFlip
        view.flipped = True
        x = step("flip", TF.hflip(x))
    if not P_JITTER < torch.rand(1).item():  # RandomApply([ColorJitter])
        c = _COLOR_JITTER
        order, *factors = T.ColorJitter.get_params(c.brightness, c.contrast, c.saturation, c.hue)
        names = list(_JITTER_OPS)
        view.jitter = {names[i]: float(factors[i]) for i in order.tolist()}
        for name, factor in view.jitter.items():
            x = _JITTER_OPS[name](x, factor)
        x = step("colour jitter", x)
    if torch.rand(1).item() < P_GRAYSCALE:  # RandomGrayscale
        view.grayscale = True
        x = step("grayscale", TF.rgb_to_grayscale(x, num_output_channels=3))
    view.blur_sigma = GaussianBlur.get_params(p_blur, aug.blur_sigma)
    if view.blur_sigma is not None:
        x = step("blur", x.filter(ImageFilter.GaussianBlur(radius=view.blur_sigma)))
    if may_solarize and torch.rand(1).item() < P_SOLARIZE:  # RandomSolarize, global 2 only
        view.solarized = True
        x = step("solarize", TF.solarize(x, SOLARIZE_THRESHOLD))
    view.image, view.steps = x, steps
    return view


def draw_views(
    image: Image.Image,
    seed: int = 0,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    n_local_crops: int = 6,
    global_size: int = 224,
    local_size: int = 96,
    record_steps: bool = False,
    blur_sigma: tuple[float, float] = BLUR_SIGMA,
) -> list[View]:
    """DINO's views of ``image`` from a seed, with records; torch's global random state is kept.

    Args:
        image: the original.
        seed: the same seed and arguments give the same views.
        global_scale: (min, max) fraction of the image area a global crop covers.
        local_scale: same for local crops.
        n_local_crops: number of local crops.
        global_size: side of the global crops in pixels.
        local_size: side of the local crops in pixels.
        record_steps: keep each augmentation's intermediate image (``View.steps``).
        blur_sigma: range of the blur's sigma in pixels (``TrainConfig.blur_sigma``).

    Returns:
        ``[global 1, global 2, local 1, ...]``.
    """
    sizes = (n_local_crops, global_size, local_size)
    aug = DataAugmentation(global_scale, local_scale, *sizes, blur_sigma=blur_sigma)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return record_views(aug, image, record_steps=record_steps)


def crop_explorer(
    image: Image.Image,
    seed: int = 0,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    n_local_crops: int = 6,
    global_size: int = 224,
    local_size: int = 96,
) -> Figure:
    """The original with each view's crop box (solid: global, dashed: local), beside the views.

    Arguments as :func:`draw_views`; the function behind notebook 01's sliders.

    Returns:
        a figure: the original and its boxes on the left, the views in a grid on the right.
    """
    from matplotlib.patches import Rectangle

    views = draw_views(
        image, seed, global_scale, local_scale, n_local_crops, global_size, local_size
    )
    labels = view_labels(views)
    colors = class_colors(max(len(views), 1))
    ncols = min(max(len(views), 2), 5)
    nrows = math.ceil(len(views) / ncols)
    fig = new_figure((4.5 + 1.6 * ncols, max(3.4, 1.8 * nrows)))
    left, right = fig.subfigures(1, 2, width_ratios=[4.5, 1.6 * ncols])
    ax = left.subplots()
    ax.imshow(to_hwc(image))
    for view, label, color in zip(views, labels, colors, strict=True):
        x0, y0, x1, y1 = view.box
        is_global = view.kind == "global"
        ax.add_patch(
            Rectangle(
                (x0, y0),
                x1 - x0,
                y1 - y0,
                fill=False,
                edgecolor=color,
                linewidth=2.5 if is_global else 1.5,
                linestyle="-" if is_global else "--",
            )
        )
        ax.text(
            x0 + 1,
            y0 + 1,
            label,
            color="white",
            fontsize=8,
            va="top",
            bbox={"facecolor": color, "pad": 1, "edgecolor": "none"},
        )
    ax.set_title(f"original {image.width}x{image.height}: {len(views)} crop boxes")
    ax.axis("off")
    axes = right.subplots(nrows, ncols, squeeze=False).flatten()
    for a, view, label, color in zip(axes, views, labels, colors, strict=False):
        a.imshow(to_hwc(view.image))
        a.set_title(f"{label}: {view.image.width}px", fontsize=9, color=color)
        a.axis("off")
    for a in axes[len(views) :]:
        a.axis("off")
    return fig


def single_augmentations(image: Image.Image, size: int = 224) -> list[tuple[str, Image.Image]]:
    """Each of DINO's augmentations alone, at its strongest setting, on the same centre crop.

    Returns:
        ``[(name, image), ...]``: the centre crop, then flip, brightness, contrast,
        saturation, hue, grayscale, blur (sigma 2, the largest drawn) and solarize, each
        applied to the centre crop only.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    image = image.convert("RGB")
    side = min(image.size)
    box = ((image.width - side) // 2, (image.height - side) // 2)
    base = image.resize(
        (size, size), Image.BICUBIC, box=(box[0], box[1], box[0] + side, box[1] + side)
    )
    b, c, s, h = JITTER
    return [
        ("centre crop", base),
        ("horizontal flip", base.transpose(Image.FLIP_LEFT_RIGHT)),
        (f"brightness x{1 + b:g}", TF.adjust_brightness(base, 1 + b)),
        (f"contrast x{1 + c:g}", TF.adjust_contrast(base, 1 + c)),
        (f"saturation x{1 - s:g}", TF.adjust_saturation(base, 1 - s)),
        (f"hue {h:+g}", TF.adjust_hue(base, h)),
        ("grayscale", base.convert("L").convert("RGB")),
        ("blur sigma 2", base.filter(ImageFilter.GaussianBlur(radius=2.0))),
        (
            f"solarize >= {SOLARIZE_THRESHOLD}",
            ImageOps.solarize(base, threshold=SOLARIZE_THRESHOLD),
        ),
    ]


def image_row(
    images: Sequence[tuple[str, Any]], ncols: int | None = None, size: float = 1.6
) -> Figure:
    """Titled images in a grid (one row by default).

    Args:
        images: ``[(title, image), ...]``; images as :func:`~dino_nb.notebook.figures.to_hwc` accepts.
        ncols: columns; default all in one row.
        size: inches per panel.
    """
    if not images:
        raise ValueError("no images to show")
    ncols = ncols or len(images)
    nrows = math.ceil(len(images) / ncols)
    fig = new_figure((size * ncols, size * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, (title, img) in zip(axes, images, strict=False):
        ax.imshow(to_hwc(img))
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def steps_figure(views: Sequence[View]) -> Figure:
    """One row per view, one column per step it went through (``record_steps=True``).

    Raises:
        ValueError: when the views hold no recorded steps.
    """
    if not views or not any(v.steps for v in views):
        raise ValueError("the views hold no steps; draw them with record_steps=True")
    ncols = max(len(v.steps) for v in views)
    fig = new_figure((1.5 * ncols + 0.4, 1.6 * len(views)))
    axes = fig.subplots(len(views), ncols, squeeze=False)
    for r, (view, label) in enumerate(zip(views, view_labels(views), strict=True)):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(view.steps):
                name, img = view.steps[c]
                ax.imshow(to_hwc(img))
                ax.set_title(f"{label}: {name}" if c == 0 else name, fontsize=8)
    fig.tight_layout()
    return fig


def view_labels(views: Sequence[View]) -> list[str]:
    """``"G1"``, ``"G2"`` for global views and ``"L1"``, ``"L2"``, ... for local ones, in order."""
    counts = {"global": 0, "local": 0}
    labels = []
    for v in views:
        counts[v.kind] = counts.get(v.kind, 0) + 1
        labels.append(f"{'G' if v.kind == 'global' else 'L'}{counts[v.kind]}")
    return labels


def _view_flags(view: View) -> str:
    flags = []
    if view.flipped:
        flags.append("flip")
    if view.jitter is not None:
        flags.append("jitter")
    if view.grayscale:
        flags.append("gray")
    if view.blur_sigma is not None:
        flags.append(f"blur {view.blur_sigma:.1f}")
    if view.solarized:
        flags.append("solarize")
    return ", ".join(flags) or "no colour aug."


def crop_grid(views: Sequence[View], ncols: int | None = None) -> Figure:
    """The augmented views side by side, titled ``G1``/``L1``... with their size and augmentations.

    Args:
        views: from :func:`~dino_nb.notebook.views.record_views`.
        ncols: columns of the grid; default all views in one row up to 6.

    Returns:
        a figure with one axis per view.
    """
    if not views:
        raise ValueError("no views to show")
    ncols = ncols or min(len(views), 6)
    nrows = math.ceil(len(views) / ncols)
    fig = new_figure((2.2 * ncols, 2.7 * nrows + 0.3))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, view, label in zip(axes, views, view_labels(views), strict=False):
        ax.imshow(to_hwc(view.image))
        ax.set_title(f"{label} ({view.image.width}px)\n{_view_flags(view)}", fontsize=8)
        ax.axis("off")
    for ax in axes[len(views) :]:
        fig.delaxes(ax)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the two global views


def global_pairs(image: Image.Image, seeds: Sequence[int] = range(6), size: int = 224) -> Figure:
    """The two global views of ``image`` for several seeds: global 1 on top, global 2 below.

    Each title lists the view's augmentations, so the figure shows the asymmetry of the
    official pipeline: global 1 is always blurred and never solarized, global 2 seldom
    blurred and sometimes solarized.

    Args:
        image: the original.
        seeds: one column per seed (:func:`draw_views`'s draw, no local crops).
        size: side of the global views in pixels.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds to draw")
    fig = new_figure((1.45 * len(seeds), 3.6))
    axes = fig.subplots(2, len(seeds), squeeze=False)
    for col, seed in enumerate(seeds):
        views = draw_views(image, seed, n_local_crops=0, global_size=size)
        for row, view in enumerate(views):
            ax = axes[row, col]
            ax.imshow(to_hwc(view.image))
            ax.set_title(f"seed {seed}, G{row + 1}\n{_view_flags(view)}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig


def global_pair_counts(n_draws: int = 1000, seed: int = 0) -> dict[str, int]:
    """How often the official pipeline blurs and solarizes each global view, over ``n_draws`` draws.

    Draws the two global views of a small random image (the draws do not depend on the
    image's content) and counts, out of ``n_draws`` pairs: global 1 blurred, global 2
    blurred, global 2 solarized, pairs whose two views differ in blur, and pairs whose
    global 2 is neither blurred nor solarized. Torch's global random state is kept.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    aug = DataAugmentation(n_local_crops=0, global_size=8, normalize=False)
    pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(seed))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    counts = dict.fromkeys(
        ("G1 blurred", "G2 blurred", "G2 solarized", "blur differs", "G2 clean"), 0
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n_draws):
            g1, g2 = record_views(aug, image)
            blurred1, blurred2 = g1.blur_sigma is not None, g2.blur_sigma is not None
            counts["G1 blurred"] += blurred1
            counts["G2 blurred"] += blurred2
            counts["G2 solarized"] += g2.solarized
            counts["blur differs"] += blurred1 != blurred2
            counts["G2 clean"] += not (blurred2 or g2.solarized)
    return counts


def blur_comparison(
    image: Image.Image,
    pairs: Sequence[tuple[int, int]] = ((224, 48), (96, 24)),
    sigma: float = 2.0,
) -> list[tuple[str, Image.Image]]:
    """The same blur sigma on a large and a small crop, and the sigma scaled with the crop.

    For each ``(paper_size, small_size)``: the centre crop of ``image`` at ``paper_size``
    blurred with ``sigma``, at ``small_size`` blurred with ``sigma`` (the same number of
    pixels, a larger part of the view), and at ``small_size`` blurred with
    ``sigma * small_size / paper_size`` (the same part of the view as the paper's).

    Returns:
        ``[(title, image), ...]``, three per pair, for :func:`image_row`.
    """
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    box = (left, top, left + side, top + side)
    out = []
    for paper_size, small_size in pairs:
        scaled = sigma * small_size / paper_size
        for size, s in ((paper_size, sigma), (small_size, sigma), (small_size, scaled)):
            crop = image.resize((size, size), Image.BICUBIC, box=box)
            title = f"{size}px, sigma {s:.2g}\n= {s / size:.1%} of the side"
            out.append((title, crop.filter(ImageFilter.GaussianBlur(radius=s))))
    return out
