"""Colour jitter and Gaussian blur on batches of image tensors, each sample with its own factors.

The batched counterparts of torchvision's PIL operations that :class:`dino_nb.DataAugmentation`
applies one image at a time (brightness, contrast, saturation, hue, then blur): the same
formulas (luma weights of ITU-R 601-2, hue as a rotation on the HSV circle), applied to a
``(B, 3, H, W)`` float batch in [0, 1] on the CPU or the GPU. :mod:`dino_nb.fast.crops`
draws the factors and calls them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..augment import (
    BLUR_SIGMA,
    device_constant,
)

#: Order of the colour-jitter operations in ``ViewParams.factors`` and ``ViewParams.order``.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


#: Factors that leave an image unchanged, per operation.
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


#: Luma weights of ``rgb_to_grayscale`` (ITU-R 601-2, as PIL and torchvision use).
_LUMA = (0.299, 0.587, 0.114)


def _sync_is_free(device: torch.device) -> bool:
    """Whether reading a mask on the host costs nothing (on the CPU), so ops may skip samples.

    Elsewhere they run branch-free on the whole batch, so the host never waits for the device.
    """
    return device.type == "cpu"


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)`` of RGB images ``(N, 3, H, W)``."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1) to broadcast over pixels


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Multiply by ``f``: blend with black."""
    return (x * _per_sample(f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (one value per image)."""
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    f = _per_sample(f)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image."""
    f = _per_sample(f)
    return (f * x + (1.0 - f) * _gray(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``f`` (a fraction of the colour circle, in [-0.5, 0.5]).

    The HSV round trip of torchvision's ``adjust_hue`` in closed form: with ``v = max``,
    ``chroma = max - min`` and the hue ``h`` in sixths of the circle, channel ``n``
    (5 for red, 3 for green, 1 for blue) is ``v - chroma * clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + h) mod 6``; value and saturation are untouched.
    """
    r, g, b = x.unbind(dim=1)  # each (N, H, W)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    c = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    hue6 = torch.where(
        maxc == r, (g - b) / c, torch.where(maxc == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c)
    )  # (N, H, W), hue in sixths, in [-1, 5)
    hue6 = hue6 + 6.0 * f.view(-1, 1, 1)
    n = device_constant((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + hue6.unsqueeze(1), 6.0)  # (N, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(
    x: torch.Tensor, jittered: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """Colour jitter with per-sample factors, each sample in its own random order of the ops.

    On an accelerator, at each of the 4 positions every op runs on the whole batch with the
    identity factor for the samples that do not use it there: no sample is gathered and
    the host never waits for the device. On the CPU, where a host synchronisation is free,
    each op runs only on the samples that use it (about 4x less work); the two agree up to
    float rounding (an op at its identity factor is exact up to rounding, not bit for bit).

    Args:
        x: ``(N, 3, H, W)`` float images in [0, 1].
        jittered: ``(N,)`` bool, whether each sample is jittered.
        factors: ``(N, 4)`` factors in :data:`JITTER_OPS` order.
        order: ``(N, 4)`` a permutation of ``0..3`` per sample: the op at each position.
    """
    if _sync_is_free(x.device):
        x = x.clone()
        for pos in range(4):
            for op, fn in enumerate(_JITTER_FNS):
                rows = (jittered & (order[:, pos] == op)).nonzero().squeeze(1)  # (n_op,)
                if rows.numel():
                    x[rows] = fn(x[rows], factors[rows, op])
        return x
    identity = device_constant(_IDENTITY, x.device, factors.dtype)
    for pos in range(4):
        for op, fn in enumerate(_JITTER_FNS):
            here = jittered & (order[:, pos] == op)
            x = fn(x, torch.where(here, factors[:, op], identity[op]))
    return x


def gaussian_blur(
    x: torch.Tensor, sigma: torch.Tensor, max_sigma: float = BLUR_SIGMA[1]
) -> torch.Tensor:
    """Blur each image with its own sigma: one separable, grouped convolution per axis.

    The kernel spans ``2 * ceil(3 * max_sigma) + 1`` taps (three standard deviations of
    the widest blur); a sample whose sigma is NaN or <= 0 is left as it is: on an
    accelerator it gets the identity kernel (no host synchronisation), on the CPU it is
    skipped. Borders repeat the edge pixels, as PIL does.

    Args:
        x: ``(N, C, H, W)`` float images.
        sigma: ``(N,)`` standard deviations in pixels.
        max_sigma: largest sigma the kernel must hold.
    """
    n, c, height, width = x.shape
    blurred = torch.isfinite(sigma) & (sigma > 0)
    if _sync_is_free(x.device) and not bool(blurred.all()):  # on the CPU, skip the unblurred
        rows = blurred.nonzero().squeeze(1)  # (n_blurred,)
        out = x.clone()
        if rows.numel():
            out[rows] = gaussian_blur(x[rows], sigma[rows], max_sigma)
        return out
    radius = int(math.ceil(3.0 * max_sigma))
    d = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (K,)
    s = torch.where(blurred, sigma, torch.ones_like(sigma)).to(x.dtype).view(-1, 1)  # (N, 1)
    kernel = torch.exp(-0.5 * (d / s) ** 2)  # (N, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (d == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(blurred.view(-1, 1), kernel, delta)
    kernel = kernel.repeat_interleave(c, dim=0)  # (N * C, K): one kernel per channel
    y = x.reshape(1, n * c, height, width)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)  # along the width
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)  # along the height
    return y.view(n, c, height, width)
