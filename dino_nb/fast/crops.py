"""Multi-crop augmentation on the accelerator, for machines with few CPU cores.

A Kaggle or Colab GPU sits beside 2 to 4 CPU cores; DINO's ten views per image then make
the CPU the bottleneck (:class:`~dino_nb.augment.DataAugmentation`, torchvision's
transforms on PIL images, costs about a millisecond per view at the paper's sizes). Here the CPU only decodes each image and resizes it to a
fixed square canvas (:class:`DecodeResize`, about a millisecond), the ``DataLoader``
collates ``uint8`` batches, and :class:`GPUMultiCrop` draws every view on the device,
per sample and without a host synchronisation:

- random resized crop (the same rule as ``RandomResizedCrop``, vectorised in
  :func:`random_resized_boxes`) and resize in one ``torchvision.ops.roi_align`` call per
  resolution (bilinear, averaging ``ceil(box / output)`` samples per output pixel when
  shrinking, so downscaling is anti-aliased);
- horizontal flip, colour jitter (brightness, contrast, saturation, hue as torchvision
  defines them on tensors, in a random order per sample), grayscale, Gaussian blur
  (separable convolution with a per-sample sigma) and solarization, with the paper's
  probabilities per view (:mod:`dino_nb.augment` holds them, so both pipelines share them).

Differences from the CPU pipeline, all small:

- **Crop region.** :class:`DecodeResize` keeps the aspect ratio: it scales the short side
  to the canvas and keeps the central square. The crop boxes are then drawn in that
  square, so a strip of ``(long - short) / 2`` on each end of the long side is never seen,
  and a crop's area fraction is relative to the square (for a 4:3 photo the square is
  75 % of the image). Padding instead would keep the whole image but waste canvas pixels
  and resolution on borders; the centre square is what most photos are about.
- **Resolution.** Crops are cut from the canvas, not from the full-size photo: choose a
  canvas at least as large as the global crops (256 for 224 crops, as evaluation does).
- **Interpolation and rounding.** Bilinear (with area averaging) instead of PIL's bicubic,
  float arithmetic instead of uint8 rounding after every step, an exact Gaussian kernel
  instead of PIL's three box passes, and the contrast mean not rounded to an integer.

``tests/test_gpu_augment.py`` compares the two pipelines' statistics (crop area and
aspect, frequency of every augmentation per view kind, brightness).

Why hand-written rather than ``kornia.augmentation``: the same views from kornia 0.9
(``benchmarks/kornia_multicrop.py``) pass the same statistical tests but were 1.34-1.39x
slower on a 2-core CPU (``benchmarks/bench_gpu_augment.py``, one thread, load 1.1-2.8:
21.8 vs 16.1 images/s for 2 x 224 + 8 x 96 from a 256 canvas, 243 vs 183 for
2 x 64 + 6 x 32 from a 73 canvas), mostly in its colour jitter and blur; they also draw
one jitter order per batch instead of per image and do not anti-alias shrinking crops.
``benchmarks/README.md`` has the full table.

Examples:
    >>> decode = DecodeResize(64)
    >>> images = torch.stack([decode(Image.new("RGB", (80, 60))) for _ in range(4)])
    >>> gpu_aug = GPUMultiCrop(n_local_crops=2, global_size=48, local_size=24)
    >>> [tuple(c.shape) for c in gpu_aug(images)]
    [(4, 3, 48, 48), (4, 3, 48, 48), (4, 3, 24, 24), (4, 3, 24, 24)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms.functional import pil_to_tensor

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
    MultiCropSettings,
    device_constant,
    imagenet_stats,
)
from .colour import _IDENTITY, _gray, color_jitter, gaussian_blur


class DecodeResize:
    """CPU side of the GPU path: an RGB image to a ``(3, canvas, canvas)`` uint8 tensor.

    The short side is scaled to ``canvas`` and the central square kept, in one PIL call
    (crop box and resize together, bilinear with PIL's anti-aliasing). Use it as the
    ``transform`` of an ``ImageFolder``; the default collate then stacks ``uint8``
    batches ``(B, 3, canvas, canvas)`` for :class:`GPUMultiCrop`. :meth:`open` is a
    matching ``loader`` that lets the JPEG decoder shrink big photos while decoding.

    Args:
        canvas: side of the square canvas in pixels; at least the global crop size is
            sensible (256 for 224 crops).
    """

    def __init__(self, canvas: int = 256) -> None:
        if canvas <= 0:
            raise ValueError(f"canvas must be positive, got {canvas}")
        self.canvas = int(canvas)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(canvas={self.canvas})"

    def open(self, path: str) -> Image.Image:
        """Open and decode an image file to RGB, letting JPEG decode at a reduced scale.

        ``Image.draft`` picks the largest power-of-two reduction (up to 1/8) that keeps both
        sides at least ``canvas``, so the short side stays >= ``canvas``.
        """
        with open(path, "rb") as f:
            img = Image.open(f)
            img.draft("RGB", (self.canvas, self.canvas))
            return img.convert("RGB")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Return the ``(3, canvas, canvas)`` uint8 centre square of ``img``."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        img = img.resize((self.canvas, self.canvas), Image.BILINEAR, box=box)
        return pil_to_tensor(img).contiguous()  # (3, canvas, canvas)


def random_resized_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """Draw ``n`` crop boxes at once with the rule of torchvision's ``RandomResizedCrop``.

    Per box: up to ``tries`` draws of an area fraction (uniform in ``scale``) and an
    aspect ratio (log-uniform in ``ratio``); the first draw whose rounded width and height
    fit is kept and placed uniformly at random; when none fits, a centre crop of the
    closest allowed ratio. All draws are made for every box up front, so there is no
    loop and no host synchronisation.

    Args:
        n: number of boxes.
        height: image height in pixels.
        width: image width in pixels.
        scale: (min, max) fraction of the image area.
        ratio: (min, max) aspect ratio width / height.
        generator: random generator on ``device``; ``None`` uses the global one.
        device: where to draw; default the generator's device or the CPU.
        tries: draws per box before the centre-crop fallback.

    Returns:
        ``(n, 4)`` float32 boxes ``(left, top, right, bottom)`` with integer values, in pixels.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    area = float(height * width)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    u = torch.rand(2, n, tries, generator=generator, device=device)  # (2, n, tries)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
    w = torch.round(torch.sqrt(target_area * aspect))  # (n, tries)
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # (n, 1): first fitting try
    found = ok.any(dim=1)  # (n,)
    w = w.gather(1, first).squeeze(1)  # (n,)
    h = h.gather(1, first).squeeze(1)

    # fallback: centre crop of the closest allowed ratio (as torchvision does)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))

    v = torch.rand(2, n, generator=generator, device=device)  # (2, n)
    top = torch.minimum(torch.floor(v[0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(v[1] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.floor((height - h) / 2))
    left = torch.where(found, left, torch.floor((width - w) / 2))
    return torch.stack([left, top, left + w, top + h], dim=1).float()  # (n, 4)


@dataclass
class ViewParams:
    """The random parameters of one view of a batch, one entry per sample.

    Attributes:
        kind: ``"global"`` or ``"local"``.
        boxes: ``(B, 4)`` crop boxes ``(left, top, right, bottom)`` in canvas pixels.
        flipped: ``(B,)`` bool, mirrored horizontally.
        jittered: ``(B,)`` bool, colour jitter applied.
        factors: ``(B, 4)`` jitter factors in :data:`JITTER_OPS` order; the identity
            ``(1, 1, 1, 0)`` where ``jittered`` is false.
        order: ``(B, 4)`` the jitter operations' order, a permutation of ``0..3`` per sample.
        grayscale: ``(B,)`` bool, turned to grayscale.
        blur_sigma: ``(B,)`` Gaussian blur sigma in output pixels, NaN where not blurred.
        solarized: ``(B,)`` bool, solarized.
    """

    kind: str
    boxes: torch.Tensor
    flipped: torch.Tensor
    jittered: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur_sigma: torch.Tensor
    solarized: torch.Tensor


# All take float images (N, 3, H, W) in [0, 1] and per-sample factors (N,), as
# torchvision.transforms.v2.functional defines them on tensors.


# ----------------------------------------------------------------------------- the module


class GPUMultiCrop(MultiCropSettings):
    """:class:`~dino_nb.augment.DataAugmentation` on a batch of uint8 canvases, on their device.

    Same arguments and the same distribution of views as the CPU pipeline (see the module
    docstring for the small differences). Every random number comes from ``generator``
    (or the global generator of the images' device), so a seeded generator reproduces
    the views.

    Args:
        global_crops_scale: range of the fraction of the canvas area a global crop covers.
        local_crops_scale: same for local crops.
        n_local_crops: number of local crops.
        global_size: side of the global crops in pixels.
        local_size: side of the local crops; ``None`` means ``size``.
        normalize: normalise with the ImageNet mean and std (``False`` returns [0, 1]).
        out_dtype: dtype of the returned crops (``torch.bfloat16`` halves the memory).

    Examples:
        >>> gpu_aug = GPUMultiCrop.from_augmentation(DataAugmentation(n_local_crops=8))
        >>> # images: (B, 3, 256, 256) uint8 on the GPU, from DecodeResize(256) + DataLoader
        >>> # crops = gpu_aug(images)  -> 2 x (B, 3, 224, 224), 8 x (B, 3, 96, 96)
    """

    _repr_extra = ("out_dtype",)

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        n_local_crops: int = 8,
        global_size: int = 224,
        local_size: int | None = None,
        normalize: bool = True,
        out_dtype: torch.dtype = torch.float32,
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
        self.out_dtype = out_dtype

    @classmethod
    def from_augmentation(
        cls, aug: DataAugmentation, out_dtype: torch.dtype = torch.float32
    ) -> GPUMultiCrop:
        """The GPU twin of a CPU :class:`~dino_nb.augment.DataAugmentation` (normalised output)."""
        return cls(
            aug.global_crops_scale,
            aug.local_crops_scale,
            aug.n_local_crops,
            aug.global_size,
            aug.local_size,
            True,
            out_dtype,
            aug.blur_sigma,
        )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """All views of a batch: ``[global 1, global 2, local 1, ..., local N]``, each ``(B, 3, s, s)``."""
        return self.views(images, generator)[0]

    def views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], list[ViewParams]]:
        """Draw all views of a batch and return them with their random parameters.

        Args:
            images: ``(B, 3, H, W)`` uint8 canvases (from :class:`DecodeResize` and the
                default collate), on the device that should do the work.
            generator: random generator on ``images.device``; ``None`` uses the global one.

        Returns:
            ``(crops, params)``: ``n_crops`` tensors ``(B, 3, size, size)`` (globals) and
            ``(B, 3, local_size, local_size)`` (locals) of ``out_dtype``, and one
            :class:`ViewParams` per view, in the same order.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a uint8 batch (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(f"generator is on {generator.device}, images on {images.device}")
        src = images.float()  # (B, 3, H, W) in [0, 255]
        g_blur, g2_blur, l_blur = P_BLUR
        bsz = images.shape[0]
        crops: list[torch.Tensor] = []
        params: list[ViewParams] = []
        n_local = self.n_local_crops
        groups = [  # kind, views, size, scale, then per view: blur and solarize probability
            (
                "global",
                2,
                self.global_size,
                self.global_crops_scale,
                (g_blur, g2_blur),
                (0.0, P_SOLARIZE),
            ),
            (
                "local",
                n_local,
                self.local_size,
                self.local_crops_scale,
                (l_blur,) * n_local,
                (0.0,) * n_local,
            ),
        ]
        for kind, n_views, out, scale, p_blur, p_sol in groups:
            if n_views == 0:
                continue
            # per-sample probabilities, view-major: view v of sample b is row v * B + b
            p_blur_t, p_sol_t = (
                device_constant(p, images.device).view(n_views, 1).expand(n_views, bsz).reshape(-1)
                for p in (p_blur, p_sol)
            )  # each (n_views,) -> (n_views * B,)
            x, p = self._group(src, n_views, out, scale, p_blur_t, p_sol_t, generator)
            crops.extend(x.chunk(n_views))
            params.extend(
                ViewParams(kind, *(t[v * bsz : (v + 1) * bsz] for t in p)) for v in range(n_views)
            )
        return crops, params

    def _group(
        self,
        src: torch.Tensor,
        n_views: int,
        out: int,
        scale: tuple[float, float],
        p_blur: torch.Tensor,
        p_solarize: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``n_views`` views of every image at one resolution: ``(n_views * B, 3, out, out)``."""
        bsz, _, height, width = src.shape
        n = n_views * bsz
        dev = src.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        # crop and resize: one roi_align over all views of this resolution
        boxes = random_resized_boxes(
            n, height, width, scale, generator=generator, device=dev
        )  # (n, 4)
        index = torch.arange(bsz, device=dev, dtype=boxes.dtype).repeat(
            n_views
        )  # source image per row
        x = roi_align(src, torch.cat([index[:, None], boxes], dim=1), output_size=out, aligned=True)
        x = (x / 255.0).clamp_(0.0, 1.0)  # (n, 3, out, out)

        flipped = rand(n) < P_FLIP
        x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)

        jittered = rand(n) < P_JITTER
        strength = device_constant(JITTER, dev)  # (4,)
        low = device_constant((1 - JITTER[0], 1 - JITTER[1], 1 - JITTER[2], -JITTER[3]), dev)
        factors = low + 2 * strength * rand(n, 4)  # (n, 4): U(1-s, 1+s), hue U(-h, h)
        identity = device_constant(_IDENTITY, dev).expand(n, 4)
        factors = torch.where(jittered[:, None], factors, identity)
        order = rand(n, 4).argsort(dim=1)  # (n, 4): a uniform random permutation per sample
        x = color_jitter(x, jittered, factors, order)

        grayscale = rand(n) < P_GRAYSCALE
        x = torch.where(grayscale.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)

        blurred = rand(n) < p_blur
        low, high = self.blur_sigma
        sigma = low + (high - low) * rand(n)
        sigma = torch.where(blurred, sigma, torch.full_like(sigma, float("nan")))
        x = gaussian_blur(x, sigma, high)

        solarized = rand(n) < p_solarize
        threshold = SOLARIZE_THRESHOLD / 255.0
        x = torch.where(solarized.view(-1, 1, 1, 1) & (x >= threshold), 1.0 - x, x)

        if self.normalize:
            mean, std = imagenet_stats(dev)  # each (3, 1, 1)
            x = x.sub_(mean).div_(std)  # x is a fresh tensor from torch.where
        return x.to(self.out_dtype), (
            boxes,
            flipped,
            jittered,
            factors,
            order,
            grayscale,
            sigma,
            solarized,
        )
