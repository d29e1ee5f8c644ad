"""Multi-crop augmentation: two global views and N local views of one image.

DINO (Caron et al. 2021, Sec. 3.1 and App. D) trains the student on many views of an
image and the teacher on the two global ones, so the student must map a small local
crop to the same representation as a crop that covers most of the image
("local-to-global correspondence").

Every random draw goes through torch's global generator, and all draws of a view happen
before any pixel work, so ``torch.manual_seed`` reproduces the views exactly. All pixel
work is done with PIL on uint8 images, at the lower of two resolutions: the crop box's own
when it is smaller than the output (then resized up once at the end) or the output's (the
box cropped and resized in one call first). Brightness, contrast and saturation are the
``Image.blend`` calls of ``PIL.ImageEnhance`` and the hue shift a table on PIL's HSV hue
channel (bit for bit what torchvision's PIL path computes, without its per-call overhead),
the blur PIL's Gaussian blur (the official DINO code uses it too; several times cheaper
than torchvision's tensor blur), and normalisation comes at the very end or on the device
(``normalize=False``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, ImageStat

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Colour jitter strengths (brightness, contrast, saturation, hue) of BYOL and DINO.
JITTER = (0.4, 0.4, 0.2, 0.1)
#: Probability that the colour jitter is applied at all (the paper; the tutorial forgot it).
P_JITTER = 0.8
P_GRAYSCALE = 0.2
P_FLIP = 0.5
#: Gaussian blur sigma range in pixels (the official code's ``radius`` of PIL's blur).
BLUR_SIGMA = (0.1, 2.0)
#: Blur probability per view: global 1, global 2, local (paper App. D).
P_BLUR = (1.0, 0.1, 0.5)
#: Solarization probability on global 2 only; threshold of the official code.
P_SOLARIZE = 0.2
SOLARIZE_THRESHOLD = 128
#: Aspect-ratio range of ``RandomResizedCrop``.
RATIO = (3 / 4, 4 / 3)


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


def _bernoulli(p: float) -> bool:
    """Draw ``True`` with probability ``p`` from torch's global generator."""
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    return bool(torch.rand(1).item() < p)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def random_resized_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float] = RATIO
) -> tuple[int, int, int, int]:
    """Draw a crop box as ``torchvision.transforms.RandomResizedCrop`` does.

    The crop covers a fraction of the image area drawn uniformly from ``scale`` and has an
    aspect ratio drawn log-uniformly from ``ratio``; after ten failed tries it falls back to
    a centre crop of the closest allowed ratio.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        scale: (min, max) fraction of the image area.
        ratio: (min, max) aspect ratio width / height.

    Returns:
        ``(left, top, right, bottom)`` in pixels, inside the image.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1])
        aspect = math.exp(_uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """Brightness as torchvision's PIL path computes it: a blend with black.

    The same ``Image.blend`` call as ``PIL.ImageEnhance.Brightness``, without building the
    enhancer object each time (pixel for pixel equal; tested).
    """
    return Image.blend(Image.new("RGB", img.size, 0), img, factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """Contrast as torchvision's PIL path computes it: a blend with the rounded mean gray level."""
    mean = int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)
    return Image.blend(Image.new("RGB", img.size, (mean, mean, mean)), img, factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    """Saturation as torchvision's PIL path computes it: a blend with the image's gray version."""
    return Image.blend(img.convert("L").convert("RGB"), img, factor)


@functools.cache
def _hue_lut(shift: int) -> tuple[int, ...]:
    return tuple((i + shift) % 256 for i in range(256))


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate the hue of an RGB image, pixel for pixel what ``torchvision``'s PIL path does.

    Like torchvision: convert to PIL's 8-bit HSV, add ``int(hue_factor * 255)`` to the hue
    channel modulo 256, convert back. The shift is done with a 256-entry lookup table on the
    hue channel in place of torchvision's round trip through a NumPy array.
    """
    shift = int(hue_factor * 255)  # truncated toward zero, as np.int32(...) does
    h, s, v = img.convert("HSV").split()
    return Image.merge("HSV", (h.point(_hue_lut(shift)), s, v)).convert("RGB")


#: jitter operations in torchvision's ``ColorJitter`` order (its random permutation indexes this)
_JITTER_OPS = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
}
_JITTER_NAMES = tuple(_JITTER_OPS)


def _draw_jitter() -> dict[str, float]:
    """Draw the colour-jitter factors, keyed in the random order they are to be applied."""
    b, c, s, h = JITTER
    order = torch.randperm(4).tolist()
    factors = {
        "brightness": _uniform(1 - b, 1 + b),
        "contrast": _uniform(1 - c, 1 + c),
        "saturation": _uniform(1 - s, 1 + s),
        "hue": _uniform(-h, h),
    }
    return {_JITTER_NAMES[i]: factors[_JITTER_NAMES[i]] for i in order}


def apply_jitter(img: Image.Image, jitter: dict[str, float]) -> Image.Image:
    """Apply brightness, contrast, saturation and hue factors in the order of ``jitter``'s keys."""
    for name, factor in jitter.items():
        img = _JITTER_OPS[name](img, factor)
    return img


def pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """Turn an RGB PIL image into a ``(3, height, width)`` uint8 tensor without copying twice."""
    array = np.asarray(img, dtype=np.uint8)  # (height, width, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def device_constant(
    values: Sequence[float],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, device, dtype), then shared.

    A tensor made from Python numbers on a GPU is copied from pageable host memory, and the
    host then waits until the GPU has run everything queued: in every step, that stops the
    CPU from queueing the next step while the GPU works on this one. The constants of the
    crops' path (ImageNet statistics, augmentation probabilities) come from here instead.
    Every caller gets the same tensor: never modify it in place.

    Args:
        values: the numbers.
        device: where the tensor lives; ``None`` is torch's default device.
        dtype: its dtype.

    Returns:
        a ``(len(values),)`` tensor.
    """
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type != "cpu" and device.index is None:  # "cuda": key the cache by the current GPU
        device = torch.empty(0, device=device).device
    return _device_constant(tuple(values), device, dtype)


@functools.cache
def _device_constant(
    values: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first asked for in inference mode
        return torch.tensor(values, device=device, dtype=dtype)


def imagenet_stats(device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std as ``(3, 1, 1)`` float32 tensors on ``device``, ready to broadcast.

    The one place the statistics become tensors: :func:`normalize_uint8`, :func:`denormalize`
    and the evaluation transform (:func:`~dino_nb.data.plain_transform`, through
    :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`) all use the same numbers. Made once per
    device (:func:`device_constant`): shared, never to be modified in place.
    """
    mean = device_constant(IMAGENET_MEAN, device).view(3, 1, 1)
    std = device_constant(IMAGENET_STD, device).view(3, 1, 1)
    return mean, std


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Scale uint8 images to [0, 1] and normalise them with the ImageNet mean and std.

    Works on a single image ``(3, H, W)`` or a batch ``(B, 3, H, W)``, on any device, so
    the normalisation can run on the GPU after collation.
    """
    mean, std = imagenet_stats(images.device)
    # (x / 255 - mean) / std as one multiply and one subtract, in place on the one new
    # float tensor: no temporaries, which on a CPU batch is ~10x faster than three passes
    return images.to(torch.float32, copy=True).mul_(1.0 / (255.0 * std)).sub_(mean / std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize_uint8``: ImageNet-normalised tensors back to [0, 1] pixel values.

    The tutorial's ``(img + 0.224) + 0.45`` is wrong on two counts (it adds the std and
    uses one channel's statistics for all three): this multiplies by each channel's std
    and adds its mean, then clips to [0, 1].

    Args:
        images: ``(3, H, W)`` or ``(B, 3, H, W)`` normalised images.
    """
    mean, std = imagenet_stats(images.device)
    return (images * std + mean).clamp(0.0, 1.0)


class MultiCropSettings:
    """The multi-crop settings shared by the CPU pipeline and its GPU twin.

    Validates the arguments once, resolves ``local_size``, and gives both classes the same
    ``n_crops`` and ``repr``. See :class:`DataAugmentation` for the meaning of each argument.
    """

    #: extra attributes shown by ``repr`` in a subclass
    _repr_extra: tuple[str, ...] = ()

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        n_local_crops: int = 8,
        global_size: int = 224,
        local_size: int | None = None,
        normalize: bool = True,
        blur_sigma: Sequence[float] = BLUR_SIGMA,
    ) -> None:
        for name, rng in (
            ("global_crops_scale", global_crops_scale),
            ("local_crops_scale", local_crops_scale),
        ):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1] <= 1:
                raise ValueError(
                    f"{name} must be (low, high) with 0 < low <= high <= 1, got {tuple(rng)}"
                )
        if n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
        if global_size <= 0 or (local_size is not None and local_size <= 0):
            raise ValueError(
                f"crop sizes must be positive, got global_size={global_size}, local_size={local_size}"
            )
        self.global_crops_scale = (float(global_crops_scale[0]), float(global_crops_scale[1]))
        self.local_crops_scale = (float(local_crops_scale[0]), float(local_crops_scale[1]))
        self.n_local_crops = int(n_local_crops)
        self.global_size = int(global_size)
        self.local_size = int(local_size) if local_size is not None else self.global_size
        self.normalize = normalize
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(
                f"blur_sigma must be (low, high) with 0 < low <= high, got {tuple(blur_sigma)}"
            )
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

    def __repr__(self) -> str:
        names = (
            "global_crops_scale",
            "local_crops_scale",
            "n_local_crops",
            "global_size",
            "local_size",
            "normalize",
            "blur_sigma",
        )
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in (*names, *self._repr_extra))
        return f"{type(self).__name__}({fields})"

    @property
    def n_crops(self) -> int:
        """Total number of views per image."""
        return 2 + self.n_local_crops


class DataAugmentation(MultiCropSettings):
    """Create 2 global crops and ``n_local_crops`` local crops of an image.

    Per view (DINO, App. D): a random resized crop (bicubic), horizontal flip (p=0.5),
    colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale with p=0.2, then Gaussian blur
    with p=1.0 for global 1, p=0.1 for global 2 and p=0.5 for local crops, and
    solarization with p=0.2 for global 2 only. Each view's random decisions are drawn
    first; the colour work and blur then run on the crop box before it is resized whenever
    the box has fewer pixels than the output (see :meth:`_render`), which gives the same
    view up to rounding for a fraction of the work.

    Args:
        global_crops_scale: range of the fraction of the image area a global crop covers.
        local_crops_scale: same for local crops.
        n_local_crops: number of local crops.
        global_size: side of the global crops in pixels (``TrainConfig.global_size``).
        local_size: side of the local crops; ``None`` means ``global_size`` (the tutorial), 96 is
            the paper's choice with 224 global crops.
        normalize: return normalised float tensors (``True``) or uint8 tensors to be
            normalised later on the device with :func:`normalize_uint8` (``False``).
        blur_sigma: range of the Gaussian blur's sigma in pixels of the output view. The
            paper's (0.1, 2) is for 224-pixel crops; at small sizes scale it with the crop
            (``TrainConfig.blur_sigma``), or a blur of sigma 2 wipes out a 48-pixel view.

    Examples:
        >>> aug = DataAugmentation(n_local_crops=2, global_size=64, local_size=32)
        >>> crops = aug(Image.new("RGB", (80, 60)))
        >>> [tuple(c.shape) for c in crops]
        [(3, 64, 64), (3, 64, 64), (3, 32, 32), (3, 32, 32)]
    """

    def _draw(self, width: int, height: int, kind: str, p_blur: float, p_solarize: float) -> View:
        """Draw every random decision of one view, in a fixed order, before any pixel work.

        The order (box, flip, jitter, grayscale, blur, solarize) is part of the seed's
        meaning: ``torch.manual_seed`` gives the same views whatever resolution they are
        later rendered at.
        """
        scale = self.global_crops_scale if kind == "global" else self.local_crops_scale
        view = View(image=None, kind=kind, box=random_resized_box(width, height, scale))  # type: ignore[arg-type]
        view.flipped = _bernoulli(P_FLIP)
        view.jitter = _draw_jitter() if _bernoulli(P_JITTER) else None
        view.grayscale = _bernoulli(P_GRAYSCALE)
        view.blur_sigma = _uniform(*self.blur_sigma) if _bernoulli(p_blur) else None
        view.solarized = _bernoulli(p_solarize)
        return view

    def _render(self, img: Image.Image, view: View, out: int, record: bool) -> None:
        """Make ``view.image``: crop, flip, colour work and blur, resize, solarize.

        The colour jitter, grayscale and blur cost in proportion to the pixels they touch,
        so they run at the lower of two resolutions: the crop box's own (then resized up to
        ``out``) or ``out`` (the box resized down first). At the tutorial's settings on
        ImageNette most crop boxes are smaller than 224x224 (a local crop covers 5-40 % of
        the photo), and working on the box is several times cheaper. All these operations
        act on each pixel alone or, for the blur, commute with resizing once its sigma is
        expressed in the box's pixels (``sigma * box side / out`` along each axis), so the
        two orders give the same view up to interpolation rounding. Solarize, a threshold,
        always runs last at the output resolution, as in the paper's recipe.
        """
        left, top, right, bottom = view.box
        box_w, box_h = right - left, bottom - top
        colour_work = view.jitter is not None or view.grayscale or view.blur_sigma is not None
        on_box = colour_work and box_w * box_h < out * out
        if on_box:
            x = img.crop(view.box)  # (box_h, box_w): the pixel work runs on these
        else:
            x = img.resize((out, out), Image.BICUBIC, box=view.box)  # crop + resize in one call
        steps: list[tuple[str, Image.Image]] = []

        def step(name: str) -> None:
            if record:  # show each step at the output size, whatever size it ran at
                steps.append(
                    (name, x if x.size == (out, out) else x.resize((out, out), Image.BICUBIC))
                )

        step("crop")
        if view.flipped:
            x = x.transpose(Image.FLIP_LEFT_RIGHT)
            step("flip")
        if view.jitter is not None:
            x = apply_jitter(x, view.jitter)
            step("colour jitter")
        if view.grayscale:
            x = x.convert("L").convert("RGB")
            step("grayscale")
        if view.blur_sigma is not None:
            sigma = view.blur_sigma  # in output pixels
            radius = (sigma * box_w / out, sigma * box_h / out) if on_box else sigma
            x = x.filter(ImageFilter.GaussianBlur(radius=radius))
            step("blur")
        if on_box:
            x = x.resize((out, out), Image.BICUBIC)
            if record:
                steps[-1] = (steps[-1][0], x)
        if view.solarized:
            x = ImageOps.solarize(x, threshold=SOLARIZE_THRESHOLD)
            step("solarize")
        view.image = x
        view.steps = steps

    def _view(
        self, img: Image.Image, kind: str, p_blur: float, p_solarize: float, record: bool
    ) -> View:
        view = self._draw(img.width, img.height, kind, p_blur, p_solarize)
        self._render(img, view, self.global_size if kind == "global" else self.local_size, record)
        return view

    def views(self, img: Image.Image, record_steps: bool = False) -> list[View]:
        """Draw all views of ``img`` with their crop boxes and applied augmentations.

        Args:
            img: input image; converted to RGB if needed.
            record_steps: keep the intermediate image after each augmentation in
                ``View.steps`` (for teaching; costs memory).

        Returns:
            ``[global 1, global 2, local 1, ..., local N]``.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        g_blur, g2_blur, l_blur = P_BLUR
        out = [
            self._view(img, "global", g_blur, 0.0, record_steps),
            self._view(img, "global", g2_blur, P_SOLARIZE, record_steps),
        ]
        out.extend(
            self._view(img, "local", l_blur, 0.0, record_steps) for _ in range(self.n_local_crops)
        )
        return out

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """Convert one view to a tensor: normalised float or uint8, per ``normalize``."""
        t = pil_to_uint8_tensor(img)  # (3, side, side)
        return normalize_uint8(t) if self.normalize else t

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """Return ``2 + n_local_crops`` tensors: ``(3, global_size, global_size)``, then ``(3, local_size, local_size)``."""
        return [self.to_tensor(v.image) for v in self.views(img)]
