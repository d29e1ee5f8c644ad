"""Multi-crop augmentation: two global views and N local views of one image.

DINO (Caron et al. 2021, Sec. 3.1 and 4.1: BYOL's augmentations with multi-crop) trains the
student on many views of an image and the teacher on the two global ones, so the student must
map a small local crop to the same representation as a crop that covers most of the image
("local-to-global correspondence").

:class:`DataAugmentation` is the official ``DataAugmentationDINO`` written with
torchvision's transforms on PIL images. They draw every random number from torch's global
generator (the blur here does too), so ``torch.manual_seed`` reproduces the views; the
training loader seeds it per image. The paper's values are named once below, and the
batched tensor twin (:mod:`dino_nb.fast.crops`) reads them from here. Normalisation comes
last, or later on the device (``normalize=False``: uint8 crops, :func:`normalize_uint8`).
Notebook 01 shows each view's crop box and steps with
:func:`dino_nb.notebook.views.record_views`, which replays this pipeline's draws.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

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
#: Blur probability per view: global 1, global 2, local (the official code's
#: DataAugmentationDINO, after BYOL).
P_BLUR = (1.0, 0.1, 0.5)
#: Solarization probability on global 2 only; threshold of the official code.
P_SOLARIZE = 0.2
SOLARIZE_THRESHOLD = 128
#: Aspect-ratio range of ``RandomResizedCrop`` (torchvision's default).
RATIO = (3 / 4, 4 / 3)


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
    """The multi-crop settings shared by :class:`DataAugmentation` and its batched twin.

    Validates the arguments once, resolves ``local_size``, and gives both classes
    (:class:`~dino_nb.fast.crops.GPUMultiCrop` is the other) the same ``n_crops`` and
    ``repr``. See :class:`DataAugmentation` for the meaning of each argument.
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


class GaussianBlur:
    """PIL's Gaussian blur with probability ``p``, its sigma drawn uniformly from ``sigma``.

    The official code's ``GaussianBlur`` (PIL's ``radius`` is the sigma), several times
    cheaper than torchvision's tensor blur, with its draws from torch's generator so that
    ``torch.manual_seed`` reproduces them.
    """

    def __init__(self, p: float, sigma: Sequence[float] = BLUR_SIGMA) -> None:
        self.p, self.sigma = p, (float(sigma[0]), float(sigma[1]))

    @staticmethod
    def get_params(p: float, sigma: Sequence[float]) -> float | None:
        """The sigma of one call, ``None`` for no blur: the draws :meth:`__call__` makes."""
        if not torch.rand(1).item() < p:
            return None
        return float(torch.empty(1).uniform_(sigma[0], sigma[1]).item())

    def __call__(self, img: Image.Image) -> Image.Image:
        """``img`` blurred with a freshly drawn sigma, or ``img`` itself (probability ``1 - p``)."""
        sigma = self.get_params(self.p, self.sigma)
        return img if sigma is None else img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


class DataAugmentation(MultiCropSettings):
    """Create 2 global crops and ``n_local_crops`` local crops of an image.

    Per view (DINO Sec. 4.1 and the official code): a random resized crop (bicubic), horizontal flip (p=0.5),
    colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale with p=0.2, then Gaussian blur
    with p=1.0 for global 1, p=0.1 for global 2 and p=0.5 for local crops, and
    solarization with p=0.2 for global 2 only.

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
        super().__init__(
            global_crops_scale,
            local_crops_scale,
            n_local_crops,
            global_size,
            local_size,
            normalize,
            blur_sigma,
        )
        # RandomResizedCrop(size, scale, ratio, interpolation), as the official code (bicubic)
        bicubic = T.InterpolationMode.BICUBIC
        global_crop = T.RandomResizedCrop(self.global_size, self.global_crops_scale, RATIO, bicubic)
        local_crop = T.RandomResizedCrop(self.local_size, self.local_crops_scale, RATIO, bicubic)
        flip_and_color_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=P_FLIP),
                T.RandomApply([T.ColorJitter(*JITTER)], p=P_JITTER),
                T.RandomGrayscale(p=P_GRAYSCALE),
            ]
        )
        blur1, blur2, blur_local = (GaussianBlur(p, self.blur_sigma) for p in P_BLUR)
        solarize = T.RandomSolarize(SOLARIZE_THRESHOLD, p=P_SOLARIZE)
        if normalize:
            to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        else:
            to_tensor = T.PILToTensor()  # uint8, (3, side, side)
        # first global crop: always blurred; second: seldom blurred, sometimes solarized
        self.global1 = T.Compose([global_crop, flip_and_color_jitter, blur1, to_tensor])
        self.global2 = T.Compose([global_crop, flip_and_color_jitter, blur2, solarize, to_tensor])
        # local crops: half of them blurred
        self.local = T.Compose([local_crop, flip_and_color_jitter, blur_local, to_tensor])

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """Return ``2 + n_local_crops`` tensors: ``(3, global_size, global_size)``, then ``(3, local_size, local_size)``."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        crops = [self.global1(img), self.global2(img)]
        crops.extend(self.local(img) for _ in range(self.n_local_crops))
        return crops
