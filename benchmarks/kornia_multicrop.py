"""The contender of ``bench_gpu_augment.py``: :class:`GPUMultiCrop`'s views from ``kornia.augmentation``.

Not a benchmark, and not used by the package: the closest ``kornia.augmentation`` (0.9)
pipeline to :class:`dino_nb.fast.crops.GPUMultiCrop`, with the same arguments, the same
call (``aug(images_uint8, generator)``), :meth:`KorniaMultiCrop.views` returning the same
:class:`~dino_nb.fast.crops.ViewParams`, and the paper's probabilities from
:mod:`dino_nb.augment`. Per view kind, on float images in [0, 1]:

``RandomResizedCrop`` (``cropping_mode="resample"``: one batched warp, no per-sample loop),
``RandomHorizontalFlip``, ``ColorJitter`` (torchvision's formulas), ``RandomGrayscale``,
``RandomGaussianBlur`` (13 taps, replicated borders as PIL) and ``RandomSolarize``
(threshold 0.5, i.e. 128/255 on uint8 levels). The two globals run as two pipelines (their
blur and solarization probabilities differ), the locals as one over ``n_local * B`` rows.

kornia draws every parameter from torch's global CPU generator; :meth:`views` forks that
generator and seeds it from ``generator``, so a seeded generator reproduces the views and
the caller's global random state is untouched.

Where it departs from the paper's pipeline (and from ``GPUMultiCrop``):

- ``ColorJitter`` draws one order of the four operations per call, shared by the batch
  (torchvision draws one per image);
- the crop is resampled bilinearly without anti-aliasing when it shrinks;
- the fallback crop (no try fits) sits at a random place instead of the centre.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from dino_nb.augment import (
    BLUR_SIGMA,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    P_BLUR,
    P_FLIP,
    P_GRAYSCALE,
    P_JITTER,
    P_SOLARIZE,
    RATIO,
    DataAugmentation,
    MultiCropSettings,
)
from dino_nb.fast.crops import ViewParams

#: Taps of the blur kernel: three standard deviations of the widest blur on each side.
KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1


def _pipeline(out: int, scale: Sequence[float], p_blur: float, p_solarize: float) -> nn.ModuleList:
    return nn.ModuleList(
        [
            K.RandomResizedCrop(
                (out, out),
                scale=tuple(scale),
                ratio=RATIO,
                align_corners=False,
                cropping_mode="resample",
            ),
            K.RandomHorizontalFlip(p=P_FLIP),
            K.ColorJitter(*JITTER, p=P_JITTER),
            K.RandomGrayscale(p=P_GRAYSCALE),
            K.RandomGaussianBlur(KERNEL, BLUR_SIGMA, border_type="replicate", p=p_blur),
            K.RandomSolarize(0.0, 0.0, p=p_solarize),
        ]
    )


def _params(kind: str, mods: nn.ModuleList) -> ViewParams:
    crop, flip, jitter, gray, blur, solarize = (m._params for m in mods)
    corners = crop["src"]  # (N, 4, 2): pixel indices of the corners, inclusive
    boxes = torch.cat([corners[:, 0], corners[:, 2] + 1], dim=1).float()  # (N, 4)
    jittered = jitter["batch_prob"].bool()
    n = len(jittered)
    factors = torch.ones(n, 4)
    factors[:, 3] = 0.0
    drawn = torch.stack(
        [jitter[f"{op}_factor"] for op in ("brightness", "contrast", "saturation", "hue")], dim=1
    )
    factors[jittered] = drawn.float().cpu()[jittered]
    blurred = blur["batch_prob"].bool()
    sigma = torch.full((n,), float("nan"))
    sigma[blurred] = blur["sigma"].float().cpu()[blurred]
    return ViewParams(
        kind,
        boxes,
        flip["batch_prob"].bool(),
        jittered,
        factors,
        jitter["order"].expand(n, 4),
        gray["batch_prob"].bool(),
        sigma,
        solarize["batch_prob"].bool(),
    )


class KorniaMultiCrop(MultiCropSettings):
    """:class:`~dino_nb.fast.crops.GPUMultiCrop`'s arguments and call, built on ``kornia.augmentation``."""

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
    ) -> None:
        super().__init__(
            global_crops_scale, local_crops_scale, n_local_crops, global_size, local_size, normalize
        )
        self.out_dtype = out_dtype
        g1_blur, g2_blur, l_blur = P_BLUR
        self.globals = [
            _pipeline(self.global_size, self.global_crops_scale, g1_blur, 0.0),
            _pipeline(self.global_size, self.global_crops_scale, g2_blur, P_SOLARIZE),
        ]
        self.locals = _pipeline(self.local_size, self.local_crops_scale, l_blur, 0.0)

    @classmethod
    def from_augmentation(
        cls, aug: DataAugmentation, out_dtype: torch.dtype = torch.float32
    ) -> KorniaMultiCrop:
        """The twin of a CPU :class:`~dino_nb.augment.DataAugmentation` (normalised output)."""
        return cls(
            aug.global_crops_scale,
            aug.local_crops_scale,
            aug.n_local_crops,
            aug.global_size,
            aug.local_size,
            True,
            out_dtype,
        )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """All views of a batch: ``[global 1, global 2, local 1, ..., local N]``, each ``(B, 3, s, s)``."""
        return self.views(images, generator)[0]

    def views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], list[ViewParams]]:
        """Views of a ``(B, 3, H, W)`` uint8 batch and their parameters, as ``GPUMultiCrop.views``."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a uint8 batch (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        device = generator.device if generator is not None else images.device
        seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
        x = images.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        crops: list[torch.Tensor] = []
        params: list[ViewParams] = []
        forked = [images.device] if images.device.type != "cpu" else []
        with torch.random.fork_rng(forked, device_type=images.device.type):
            torch.manual_seed(seed)
            for mods in self.globals:
                y = x
                for m in mods:
                    y = m(y)
                crops.append(y)
                params.append(_params("global", mods))
            if self.n_local_crops:
                y = x.repeat(self.n_local_crops, 1, 1, 1)  # (n_local * B, 3, H, W), view-major
                for m in self.locals:
                    y = m(y)
                crops.extend(y.chunk(self.n_local_crops))
                p = _params("local", self.locals)
                bsz = images.shape[0]
                params.extend(
                    ViewParams(
                        "local",
                        *(
                            t[v * bsz : (v + 1) * bsz]
                            for t in vars(p).values()
                            if torch.is_tensor(t)
                        ),
                    )
                    for v in range(self.n_local_crops)
                )
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            crops = [(c - mean) / std for c in crops]
        return [c.to(self.out_dtype) for c in crops], params
