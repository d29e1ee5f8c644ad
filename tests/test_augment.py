"""Oracle tests for the multi-crop augmentation (DINO, App. D)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from dino_nb import augment as A
from dino_nb.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataAugmentation,
    denormalize,
    normalize_uint8,
    random_resized_box,
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


# --------------------------------------------------------------------------- count and sizes


@pytest.mark.parametrize("n_local", [0, 1, 4])
def test_number_of_crops(n_local):
    a = aug(n_local=n_local)
    crops = a(random_image())
    assert len(crops) == 2 + n_local == a.n_crops
    assert [v.kind for v in a.views(random_image())] == ["global", "global"] + ["local"] * n_local


def test_sizes_with_local_size():
    crops = aug(n_local=3, global_size=16, local_size=8)(random_image())
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3


def test_sizes_without_local_size_default_to_global_size():
    a = aug(n_local=2, global_size=12, local_size=None)
    assert a.local_size == 12
    crops = a(random_image())
    assert [tuple(c.shape) for c in crops] == [(3, 12, 12)] * 4


# --------------------------------------------------------------------------- values


def test_normalised_values_within_the_normalised_unit_range():
    low = (0 - MEAN) / STD  # (3, 1, 1)
    high = (1 - MEAN) / STD
    torch.manual_seed(0)
    a = aug(n_local=2)
    for seed in range(5):
        for c in a(random_image(seed=seed)):
            assert c.dtype == torch.float32
            assert torch.all(c >= low - 1e-5) and torch.all(c <= high + 1e-5)


def test_uint8_output_when_not_normalising():
    torch.manual_seed(0)
    crops = aug(normalize=False)(random_image())
    assert all(c.dtype == torch.uint8 for c in crops)
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    # the same draws normalised later give the float pipeline's output
    torch.manual_seed(0)
    floats = aug(normalize=True)(random_image())
    for u, f in zip(crops, floats, strict=True):
        torch.testing.assert_close(normalize_uint8(u), f)


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


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_crops_different_seed_different_crops():
    a, img = aug(), random_image()
    torch.manual_seed(123)
    first = a(img)
    torch.manual_seed(123)
    second = a(img)
    torch.manual_seed(124)
    third = a(img)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(first, third, strict=True))


# --------------------------------------------------------------------------- crop boxes


def box_inside(box, width, height):
    left, top, right, bottom = box
    return 0 <= left < right <= width and 0 <= top < bottom <= height


@pytest.mark.parametrize("width,height", [(40, 30), (30, 40), (5, 7), (100, 12), (1, 1)])
def test_crop_boxes_inside_the_image(width, height):
    torch.manual_seed(0)
    a = aug(
        n_local=4, global_size=16, local_size=8
    )  # crops larger than the (5, 7) and (1, 1) images
    img = random_image(width, height)
    for _ in range(25):
        views = a.views(img)
        for v in views:
            assert box_inside(v.box, width, height), (v.box, width, height)
            side = 16 if v.kind == "global" else 8
            assert v.image.size == (side, side) and v.image.mode == "RGB"


def test_random_resized_box_area_and_ratio():
    torch.manual_seed(0)
    width, height = 200, 150
    for _ in range(200):
        box = random_resized_box(width, height, (0.3, 0.6))
        assert box_inside(box, width, height)
        w, h = box[2] - box[0], box[3] - box[1]
        # rounding w and h to integers moves area and ratio a little
        assert 0.3 * 0.97 <= w * h / (width * height) <= 0.6 * 1.03
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_random_resized_box_fallback_is_the_centred_crop_of_the_closest_ratio():
    # a 200x10 strip: every try at area >= 40 % with ratio <= 4/3 is taller than 10 px
    torch.manual_seed(0)
    w = int(round(10 * 4 / 3))
    assert random_resized_box(200, 10, (0.4, 1.0)) == ((200 - w) // 2, 0, (200 - w) // 2 + w, 10)
    h = int(round(10 / (3 / 4)))
    assert random_resized_box(10, 200, (0.4, 1.0)) == (0, (200 - h) // 2, 10, (200 - h) // 2 + h)


def test_box_is_the_region_that_was_cropped():
    """A view without colour operations equals the reference crop of its recorded box."""
    img = random_image(48, 36, seed=3)
    a = aug(n_local=2)
    torch.manual_seed(0)
    checked = 0
    for _ in range(200):
        for v in a.views(img):
            if v.jitter is None and not v.grayscale and v.blur_sigma is None and not v.solarized:
                side = v.image.size[0]
                ref = img.resize((side, side), Image.BICUBIC, box=v.box)
                if v.flipped:
                    ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
                assert np.array_equal(np.asarray(ref), np.asarray(v.image))
                checked += 1
    assert checked > 10


# --------------------------------------------------------------------------- input modes


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_non_rgb_inputs_are_converted(mode):
    img = random_image(20, 14, mode=mode) if mode != "I;16" else Image.new("I;16", (20, 14), 300)
    crops = aug(n_local=1, normalize=False)(img)
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)]
    assert all(v.image.mode == "RGB" for v in aug(n_local=1).views(img))


# --------------------------------------------------------------------------- probabilities


N_DRAWS = 2000


@pytest.fixture(scope="module")
def many_views():
    a = DataAugmentation((0.4, 1.0), (0.05, 0.4), n_local_crops=2, global_size=8, local_size=8)
    img = random_image(12, 12, seed=1)
    torch.manual_seed(0)
    return [a.views(img) for _ in range(N_DRAWS)]


def assert_binomial(k: int, n: int, p: float, sigmas: float = 5.0):
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= sigmas * sd, f"{k}/{n} = {k / n:.3f}, expected p = {p}"


def test_blur_probabilities_per_view(many_views):
    g1 = [v[0] for v in many_views]
    g2 = [v[1] for v in many_views]
    local = [x for v in many_views for x in v[2:]]
    assert all(v.blur_sigma is not None for v in g1)  # global 1: always
    assert_binomial(sum(v.blur_sigma is not None for v in g2), len(g2), 0.1)
    assert_binomial(sum(v.blur_sigma is not None for v in local), len(local), 0.5)
    sigmas = [v.blur_sigma for views in many_views for v in views if v.blur_sigma is not None]
    assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0


def test_solarize_only_on_global_2(many_views):
    assert_binomial(sum(v[1].solarized for v in many_views), N_DRAWS, 0.2)
    assert not any(v[0].solarized for v in many_views)
    assert not any(x.solarized for v in many_views for x in v[2:])


def test_jitter_grayscale_flip_probabilities(many_views):
    flat = [x for v in many_views for x in v]
    assert_binomial(sum(v.jitter is not None for v in flat), len(flat), 0.8)
    assert_binomial(sum(v.grayscale for v in flat), len(flat), 0.2)
    assert_binomial(sum(v.flipped for v in flat), len(flat), 0.5)
    for v in flat[:200]:
        if v.jitter is not None:
            assert 0.6 <= v.jitter["brightness"] <= 1.4
            assert 0.6 <= v.jitter["contrast"] <= 1.4
            assert 0.8 <= v.jitter["saturation"] <= 1.2
            assert -0.1 <= v.jitter["hue"] <= 0.1


def test_grayscale_views_have_equal_channels(many_views):
    gray = [x for v in many_views[:300] for x in v if x.grayscale]
    assert gray
    for v in gray:
        arr = np.asarray(v.image)
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_recorded_steps_match_flags():
    torch.manual_seed(0)
    for views in (aug(n_local=2).views(random_image(), record_steps=True) for _ in range(20)):
        for v in views:
            expected = ["crop"]
            expected += ["flip"] * v.flipped + ["colour jitter"] * (v.jitter is not None)
            expected += ["grayscale"] * v.grayscale + ["blur"] * (v.blur_sigma is not None)
            expected += ["solarize"] * v.solarized
            assert [name for name, _ in v.steps] == expected
            assert v.steps[-1][1] is v.image
    assert all(v.steps == [] for v in aug().views(random_image()))


def test_constants_are_the_papers():
    assert A.P_BLUR == (1.0, 0.1, 0.5)
    assert A.P_SOLARIZE == 0.2 and A.P_JITTER == 0.8 and A.P_GRAYSCALE == 0.2 and A.P_FLIP == 0.5
    assert A.JITTER == (0.4, 0.4, 0.2, 0.1)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(global_crops_scale=(0.0, 1.0)),
        dict(global_crops_scale=(0.5, 0.4)),
        dict(local_crops_scale=(0.05, 1.5)),
        dict(local_crops_scale=(0.1,)),
        dict(n_local_crops=-1),
        dict(global_size=0),
        dict(local_size=-8),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        DataAugmentation(**kwargs)


# --------------------------------------------------------------------------- pixel work


@pytest.mark.parametrize("seed", range(5))
def test_colour_ops_match_torchvision_bit_for_bit(seed):
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(seed)
    img = random_image(23, 17, seed=seed)
    for factor in [0.0, 0.6, 1.0, 1.4, *rng.uniform(0.6, 1.4, 20)]:
        assert np.array_equal(
            np.asarray(A.adjust_brightness(img, factor)),
            np.asarray(TF.adjust_brightness(img, factor)),
        )
        assert np.array_equal(
            np.asarray(A.adjust_contrast(img, factor)), np.asarray(TF.adjust_contrast(img, factor))
        )
        assert np.array_equal(
            np.asarray(A.adjust_saturation(img, factor)),
            np.asarray(TF.adjust_saturation(img, factor)),
        )
    for hue in [-0.1, -0.05, 0.0, 0.003, 0.1, *rng.uniform(-0.1, 0.1, 20)]:
        assert np.array_equal(
            np.asarray(A.adjust_hue(img, hue)), np.asarray(TF.adjust_hue(img, hue))
        )


def test_jitter_is_applied_in_the_order_of_its_keys():
    from torchvision.transforms import functional as TF

    ops = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
    }
    img = random_image(20, 20, seed=4)
    torch.manual_seed(0)
    orders = set()
    for _ in range(60):
        jitter = A._draw_jitter()
        orders.add(tuple(jitter))
        expected = img
        for name, factor in jitter.items():
            expected = ops[name](expected, factor)
        assert np.array_equal(np.asarray(A.apply_jitter(img, jitter)), np.asarray(expected))
    assert len(orders) > 12  # a random permutation of the four, not a fixed order


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: random colours at 1/8 resolution, resized up (no pixel noise)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((width, height), Image.BICUBIC)


def flip_colour_blur(x: Image.Image, v: A.View) -> Image.Image:
    """The view's flip, jitter, grayscale and blur (sigma as drawn), in the pipeline's order."""
    if v.flipped:
        x = x.transpose(Image.FLIP_LEFT_RIGHT)
    if v.jitter is not None:
        x = A.apply_jitter(x, v.jitter)
    if v.grayscale:
        x = x.convert("L").convert("RGB")
    if v.blur_sigma is not None:
        x = x.filter(ImageFilter.GaussianBlur(v.blur_sigma))
    return x


def render_resize_first(img: Image.Image, v: A.View, out: int) -> np.ndarray:
    """The straightforward order: crop+resize to ``out``, then every operation at ``out``."""
    x = flip_colour_blur(img.resize((out, out), Image.BICUBIC, box=v.box), v)
    if v.solarized:
        x = ImageOps.solarize(x, A.SOLARIZE_THRESHOLD)
    return np.asarray(x, dtype=np.float64)


def test_views_worked_on_the_small_crop_box_match_the_resize_first_order():
    """Colour work and blur run on the box when it is smaller than the output: same view."""
    img = smooth_image(224, 224, seed=2)
    a = DataAugmentation(n_local_crops=8, global_size=224, normalize=False)
    torch.manual_seed(0)
    on_box = blurred = 0
    for _ in range(6):
        for v in a.views(img):
            left, top, right, bottom = v.box
            colour_work = v.jitter is not None or v.grayscale or v.blur_sigma is not None
            if not colour_work or (right - left) * (bottom - top) >= 224 * 224:
                continue
            on_box += 1
            diff = np.abs(np.asarray(v.image, dtype=np.float64) - render_resize_first(img, v, 224))
            # PIL's 8-bit HSV quantises the hue (its round trip at hue 0 alone moves pixels by
            # ~0.5 levels on average here), so the two orders differ by a level or two
            assert diff.mean() < 2.5, (v, diff.mean())
            if v.blur_sigma is not None and v.blur_sigma > 1.0 and (right - left) < 112:
                # the blur's sigma is rescaled to the box's pixels: without that, the
                # upsampled blur would be several times too wide
                blurred += 1
                wrong = flip_colour_blur(img.crop(v.box), v).resize((224, 224), Image.BICUBIC)
                wrong_diff = np.abs(
                    np.asarray(wrong, dtype=np.float64) - render_resize_first(img, v, 224)
                )
                assert wrong_diff.mean() > 2 * diff.mean()
    assert on_box > 20 and blurred > 0


def test_recorded_steps_do_not_change_the_views():
    img = smooth_image(64, 48, seed=5)
    a = DataAugmentation(n_local_crops=4, global_size=48, local_size=24)
    for seed in range(10):
        torch.manual_seed(seed)
        plain = a.views(img)
        torch.manual_seed(seed)
        recorded = a.views(img, record_steps=True)
        for p, r in zip(plain, recorded, strict=True):
            assert np.array_equal(np.asarray(p.image), np.asarray(r.image))
            assert all(step.size == p.image.size for _, step in r.steps)


def test_random_decisions_do_not_depend_on_the_pixels():
    """Every draw happens before pixel work: a seed means the same views for any content."""
    a = aug(n_local=4, global_size=16, local_size=8)
    records = []
    for content_seed in (0, 1):
        torch.manual_seed(7)
        views = a.views(random_image(40, 30, seed=content_seed))
        records.append(
            [(v.box, v.flipped, v.jitter, v.grayscale, v.blur_sigma, v.solarized) for v in views]
        )
    assert records[0] == records[1]


def test_blur_sigma_range_is_a_setting():
    """A 48-pixel recipe scales the paper's (0.1, 2) for 224 pixels down with the crop."""
    a = DataAugmentation(n_local_crops=2, global_size=8, local_size=8, blur_sigma=(0.02, 0.4))
    img = random_image(12, 12, seed=1)
    torch.manual_seed(0)
    sigmas = [v.blur_sigma for _ in range(300) for v in a.views(img) if v.blur_sigma is not None]
    assert min(sigmas) >= 0.02 and max(sigmas) <= 0.4 and max(sigmas) > 0.3
    assert "blur_sigma=(0.02, 0.4)" in repr(a)
    with pytest.raises(ValueError, match="blur_sigma"):
        DataAugmentation(blur_sigma=(0.5, 0.1))
