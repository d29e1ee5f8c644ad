"""Tests for the multi-crop augmentation (DINO Sec. 4.1 and the official code) and the normalisation helpers.

How each view is drawn (boxes, per-step probabilities) is tested on its record in
``test_views.py``, which also holds the record to be this pipeline's output pixel for pixel.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dino_nb import augment as A
from dino_nb.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataAugmentation,
    GaussianBlur,
    denormalize,
    normalize_uint8,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def random_image(
    width: int = 40, height: int = 30, seed: int = 0, mode: str = "RGB"
) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def aug(
    n_local: int = 3, global_size: int = 16, local_size: int | None = 8, normalize: bool = True
) -> DataAugmentation:
    return DataAugmentation(
        (0.4, 1.0),
        (0.05, 0.4),
        n_local_crops=n_local,
        global_size=global_size,
        local_size=local_size,
        normalize=normalize,
    )


# --------------------------------------------------------------------------- count, sizes, dtypes


@pytest.mark.parametrize("n_local", [0, 1, 4])
def test_two_global_then_n_local_crops(n_local):
    a = aug(n_local=n_local, global_size=16, local_size=8)
    crops = a(random_image())
    assert len(crops) == 2 + n_local == a.n_crops
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * n_local


def test_local_size_defaults_to_global_size():
    a = aug(n_local=2, global_size=12, local_size=None)
    assert a.local_size == 12
    assert [tuple(c.shape) for c in a(random_image())] == [(3, 12, 12)] * 4


@pytest.mark.parametrize("width,height", [(5, 7), (200, 10), (1, 1)])
def test_crops_larger_than_the_image_or_of_extreme_aspect(width, height):
    torch.manual_seed(0)
    crops = aug(n_local=2, normalize=False)(random_image(width, height))
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_non_rgb_inputs_are_converted(mode):
    img = random_image(20, 14, mode=mode) if mode != "I;16" else Image.new("I;16", (20, 14), 300)
    crops = aug(n_local=1, normalize=False)(img)
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)]


# --------------------------------------------------------------------------- normalisation


def test_normalised_floats_or_uint8_from_the_same_draws():
    torch.manual_seed(0)
    crops = aug(normalize=False)(random_image())
    assert all(c.dtype == torch.uint8 for c in crops)
    torch.manual_seed(0)
    floats = aug(normalize=True)(random_image())
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD  # each (3, 1, 1)
    for u, f in zip(crops, floats, strict=True):
        assert f.dtype == torch.float32
        assert torch.all(f >= low - 1e-5) and torch.all(f <= high + 1e-5)
        torch.testing.assert_close(normalize_uint8(u), f)  # normalised later on the device
        torch.testing.assert_close(denormalize(f), u.float() / 255, atol=1e-6, rtol=0)


def test_normalize_uint8_matches_the_formula_and_denormalize_inverts_it():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = (x.double() / 255 - MEAN.double()) / STD.double()
    torch.testing.assert_close(normalize_uint8(x).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(denormalize(normalize_uint8(x)), x.float() / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        denormalize(normalize_uint8(x[0])), x[0].float() / 255, atol=1e-6, rtol=0
    )
    assert x.dtype == torch.uint8  # input untouched
    extreme = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2)
    torch.testing.assert_close(
        denormalize(normalize_uint8(extreme) * 2),
        torch.tensor([0.0, 1.0]).view(1, 1, 2).expand(3, 1, 2),
    )


def test_imagenet_stats_are_made_once_per_device_and_serve_autograd_after_inference_mode():
    A._device_constant.cache_clear()
    with torch.inference_mode():  # the first request (an evaluation) made them here
        normalize_uint8(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    mean, std = A.imagenet_stats("cpu")
    assert A.imagenet_stats(torch.device("cpu"))[1].data_ptr() == std.data_ptr()  # not rebuilt
    x = torch.rand(1, 3, 2, 2, requires_grad=True)
    denormalize(x).sum().backward()  # saves std for backward, which an inference tensor cannot be
    torch.testing.assert_close(x.grad, STD.expand(1, 3, 2, 2))


# --------------------------------------------------------------------------- randomness


def test_same_seed_same_crops_different_seed_different_crops():
    a, img = aug(), random_image()
    torch.manual_seed(123)
    first = a(img)
    torch.manual_seed(123)
    second = a(img)
    torch.manual_seed(124)
    third = a(img)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, third, strict=True))


def assert_binomial(k: int, n: int, p: float, sigmas: float = 5.0):
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= sigmas * sd, f"{k}/{n} = {k / n:.3f}, expected p = {p}"


def test_solarize_only_on_global_2():
    # A white image stays >= 153 through crop, flip, jitter (brightness >= 0.6; contrast,
    # saturation and hue leave grey alone), grayscale and blur; solarizing turns it <= 102.
    a = DataAugmentation(n_local_crops=2, global_size=4, local_size=4, normalize=False)
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    torch.manual_seed(0)
    n = 1000
    solarized = torch.tensor([[c.max() < 128 for c in a(white)] for _ in range(n)])  # (n, 4)
    assert not solarized[:, 0].any() and not solarized[:, 2:].any()
    assert_binomial(int(solarized[:, 1].sum()), n, A.P_SOLARIZE)


def test_blur_draws_its_sigma_from_the_range_with_its_probability():
    torch.manual_seed(0)
    sigmas = [GaussianBlur.get_params(0.5, (0.3, 0.7)) for _ in range(2000)]
    drawn = [s for s in sigmas if s is not None]
    assert_binomial(len(drawn), len(sigmas), 0.5)
    assert 0.3 <= min(drawn) and max(drawn) <= 0.7
    assert all(GaussianBlur.get_params(1.0, (0.1, 2.0)) is not None for _ in range(100))
    img = random_image(20, 20)
    assert GaussianBlur(0.0)(img) is img


def test_blur_sigma_reaches_the_blur():
    a = DataAugmentation(n_local_crops=0, global_size=8, blur_sigma=(0.02, 0.4))
    blurs = [t for t in a.global1.transforms if isinstance(t, GaussianBlur)]
    assert [b.sigma for b in blurs] == [(0.02, 0.4)]


def test_constants_are_the_papers():
    assert A.P_BLUR == (1.0, 0.1, 0.5)
    assert A.P_SOLARIZE == 0.2 and A.P_JITTER == 0.8 and A.P_GRAYSCALE == 0.2 and A.P_FLIP == 0.5
    assert A.JITTER == (0.4, 0.4, 0.2, 0.1) and A.BLUR_SIGMA == (0.1, 2.0)
    assert A.SOLARIZE_THRESHOLD == 128


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(global_crops_scale=(0.0, 1.0)), "global_crops_scale"),
        (dict(local_crops_scale=(0.05, 1.5)), "local_crops_scale"),
        (dict(n_local_crops=-1), "n_local_crops"),
        (dict(local_size=-8), "crop sizes"),
        (dict(blur_sigma=(0.5, 0.1)), "blur_sigma"),
    ],
)
def test_bad_arguments_raise_one_clear_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DataAugmentation(**kwargs)
