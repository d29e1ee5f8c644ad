"""Multi-crop augmentation: two global views and N local views of one image.

DINO (Caron et al. 2021, Sec. 3.1 and App. D) trains the student on many views of an
image and the teacher on the two global ones, so the student must map a small local
crop to the same representation as a crop that covers most of the image
("local-to-global correspondence").

Every random draw goes through torch's global generator, so ``torch.manual_seed``
reproduces the views exactly. All pixel work is done with PIL on uint8 images: crop
and resize in one call, PIL's Gaussian blur (the official DINO code uses it too, and it
is several times cheaper than torchvision's tensor blur on a 224 crop), and
normalisation at the very end (or on the device, see ``normalize=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

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
        image: the augmented crop, a ``size x size`` RGB PIL image (not normalised).
        kind: ``"global"`` or ``"local"``.
        box: ``(left, top, right, bottom)`` of the crop in the original image, in pixels.
        flipped: whether the crop was mirrored horizontally.
        jitter: the colour-jitter factors applied, ``None`` when jitter was skipped.
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


def _color_jitter(img: Image.Image) -> tuple[Image.Image, dict[str, float]]:
    """Apply brightness, contrast, saturation and hue jitter in a random order."""
    b, c, s, h = JITTER
    order = torch.randperm(4).tolist()
    factors = {
        "brightness": _uniform(1 - b, 1 + b),
        "contrast": _uniform(1 - c, 1 + c),
        "saturation": _uniform(1 - s, 1 + s),
        "hue": _uniform(-h, h),
    }
    ops = [
        ("brightness", TF.adjust_brightness),
        ("contrast", TF.adjust_contrast),
        ("saturation", TF.adjust_saturation),
        ("hue", TF.adjust_hue),
    ]
    for i in order:
        name, op = ops[i]
        img = op(img, factors[name])
    return img, factors


def pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """Turn an RGB PIL image into a ``(3, height, width)`` uint8 tensor without copying twice."""
    array = np.asarray(img, dtype=np.uint8)  # (height, width, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Scale uint8 images to [0, 1] and normalise them with the ImageNet mean and std.

    Works on a single image ``(3, H, W)`` or a batch ``(B, 3, H, W)``, on any device, so
    the normalisation can run on the GPU after collation.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
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
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
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
        size: int = 224,
        local_size: int | None = None,
        normalize: bool = True,
    ) -> None:
        for name, rng in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1] <= 1:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {tuple(rng)}")
        if n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
        if size <= 0 or (local_size is not None and local_size <= 0):
            raise ValueError(f"crop sizes must be positive, got size={size}, local_size={local_size}")
        self.global_crops_scale = (float(global_crops_scale[0]), float(global_crops_scale[1]))
        self.local_crops_scale = (float(local_crops_scale[0]), float(local_crops_scale[1]))
        self.n_local_crops = int(n_local_crops)
        self.size = int(size)
        self.local_size = int(local_size) if local_size is not None else self.size
        self.normalize = normalize

    def __repr__(self) -> str:
        names = ("global_crops_scale", "local_crops_scale", "n_local_crops", "size", "local_size", "normalize")
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
    solarization with p=0.2 for global 2 only.

    Args:
        global_crops_scale: range of the fraction of the image area a global crop covers.
        local_crops_scale: same for local crops.
        n_local_crops: number of local crops.
        size: side of the global crops in pixels.
        local_size: side of the local crops; ``None`` means ``size`` (the tutorial), 96 is
            the paper's choice with 224 global crops.
        normalize: return normalised float tensors (``True``) or uint8 tensors to be
            normalised later on the device with :func:`normalize_uint8` (``False``).

    Examples:
        >>> aug = DataAugmentation(n_local_crops=2, size=64, local_size=32)
        >>> crops = aug(Image.new("RGB", (80, 60)))
        >>> [tuple(c.shape) for c in crops]
        [(3, 64, 64), (3, 64, 64), (3, 32, 32), (3, 32, 32)]
    """

    def _view(
        self, img: Image.Image, kind: str, p_blur: float, p_solarize: float, record: bool
    ) -> View:
        scale, out = (
            (self.global_crops_scale, self.size) if kind == "global" else (self.local_crops_scale, self.local_size)
        )
        box = random_resized_box(img.width, img.height, scale)
        view = View(image=img, kind=kind, box=box)
        # crop and resize in one PIL call: no intermediate crop image
        x = img.resize((out, out), Image.BICUBIC, box=box)
        steps = [("crop", x)] if record else []
        if _bernoulli(P_FLIP):
            x = x.transpose(Image.FLIP_LEFT_RIGHT)
            view.flipped = True
            if record:
                steps.append(("flip", x))
        if _bernoulli(P_JITTER):
            x, view.jitter = _color_jitter(x)
            if record:
                steps.append(("colour jitter", x))
        if _bernoulli(P_GRAYSCALE):
            x = x.convert("L").convert("RGB")
            view.grayscale = True
            if record:
                steps.append(("grayscale", x))
        if _bernoulli(p_blur):
            view.blur_sigma = _uniform(*BLUR_SIGMA)
            x = x.filter(ImageFilter.GaussianBlur(radius=view.blur_sigma))
            if record:
                steps.append(("blur", x))
        if _bernoulli(p_solarize):
            x = ImageOps.solarize(x, threshold=SOLARIZE_THRESHOLD)
            view.solarized = True
            if record:
                steps.append(("solarize", x))
        view.image = x
        view.steps = steps
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
        out.extend(self._view(img, "local", l_blur, 0.0, record_steps) for _ in range(self.n_local_crops))
        return out

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """Convert one view to a tensor: normalised float or uint8, per ``normalize``."""
        t = pil_to_uint8_tensor(img)  # (3, size, size)
        return normalize_uint8(t) if self.normalize else t

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """Return ``2 + n_local_crops`` tensors of shape ``(3, size, size)``/``(3, local_size, local_size)``."""
        return [self.to_tensor(v.image) for v in self.views(img)]
