"""How each view was made: :class:`~dino_nb.augment.DataAugmentation`'s views with their records.

``DataAugmentation`` returns tensors only. Notebook 01 also wants each view's crop box on
the original, the augmentations it drew and the image after each step. :func:`record_views`
replays the pipeline one step at a time with torchvision's functional API, drawing every
random number where the transforms draw it (``RandomResizedCrop.get_params``,
``ColorJitter.get_params``, one ``torch.rand`` per random choice), so under the same torch
seed it gives the same views, pixel for pixel (``tests/test_views.py`` holds it to that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..augment import (
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
