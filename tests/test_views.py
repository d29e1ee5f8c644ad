"""The recorded views of notebook 01 are DataAugmentation's views, and their records are right."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from dino_nb.augment import DataAugmentation
from dino_nb.notebook.views import (
    blur_comparison,
    global_pair_counts,
    global_pairs,
    record_views,
)


def random_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def aug(n_local: int = 3, global_size: int = 16, local_size: int = 8) -> DataAugmentation:
    return DataAugmentation(
        n_local_crops=n_local, global_size=global_size, local_size=local_size, normalize=False
    )


@pytest.mark.parametrize("width,height", [(40, 30), (30, 40), (5, 7), (200, 10), (1, 1)])
def test_records_are_the_pipelines_views_pixel_for_pixel(width, height):
    a, img = aug(n_local=4), random_image(width, height)
    for seed in range(12):
        torch.manual_seed(seed)
        crops = a(img)
        after_pipeline = torch.get_rng_state()
        torch.manual_seed(seed)
        views = record_views(a, img, record_steps=seed % 2 == 0)
        assert torch.equal(torch.get_rng_state(), after_pipeline)  # the same number of draws
        for crop, view in zip(crops, views, strict=True):
            assert torch.equal(pil_to_tensor(view.image), crop), (seed, view)


def test_kinds_sizes_and_boxes_inside_the_image():
    a, img = aug(n_local=3), random_image(48, 36)
    torch.manual_seed(0)
    for _ in range(20):
        views = record_views(a, img)
        assert [v.kind for v in views] == ["global"] * 2 + ["local"] * 3
        for v in views:
            left, top, right, bottom = v.box
            assert 0 <= left < right <= 48 and 0 <= top < bottom <= 36
            side = 16 if v.kind == "global" else 8
            assert v.image.size == (side, side) and v.image.mode == "RGB"


def test_recorded_steps_match_flags():
    torch.manual_seed(0)
    for views in (
        record_views(aug(n_local=2), random_image(), record_steps=True) for _ in range(20)
    ):
        for v in views:
            expected = ["crop"]
            expected += ["flip"] * v.flipped + ["colour jitter"] * (v.jitter is not None)
            expected += ["grayscale"] * v.grayscale + ["blur"] * (v.blur_sigma is not None)
            expected += ["solarize"] * v.solarized
            assert [name for name, _ in v.steps] == expected
            assert v.steps[-1][1] is v.image
    assert all(v.steps == [] for v in record_views(aug(), random_image()))


# --------------------------------------------------------------------------- probabilities

N_DRAWS = 2000


@pytest.fixture(scope="module")
def many_views():
    a = DataAugmentation((0.4, 1.0), (0.05, 0.4), n_local_crops=2, global_size=8, local_size=8)
    img = random_image(12, 12, seed=1)
    torch.manual_seed(0)
    return [record_views(a, img) for _ in range(N_DRAWS)]


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


def test_jitter_grayscale_flip_probabilities_and_ranges(many_views):
    flat = [x for v in many_views for x in v]
    assert_binomial(sum(v.jitter is not None for v in flat), len(flat), 0.8)
    assert_binomial(sum(v.grayscale for v in flat), len(flat), 0.2)
    assert_binomial(sum(v.flipped for v in flat), len(flat), 0.5)
    orders = {tuple(v.jitter) for v in flat if v.jitter is not None}
    assert len(orders) == 24  # every order of the four operations
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


# --------------------------------------------------------------------------- the two global views


def test_global_pair_counts_follow_the_pipelines_probabilities():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    counts = global_pair_counts(n_draws=1000, seed=3)
    assert torch.equal(torch.rand(1), before)  # torch's global random state is kept
    assert counts["G1 blurred"] == 1000  # global 1: always blurred
    assert_binomial(counts["G2 blurred"], 1000, 0.1)
    assert_binomial(counts["G2 solarized"], 1000, 0.2)
    assert counts["blur differs"] == 1000 - counts["G2 blurred"]
    assert_binomial(counts["G2 clean"], 1000, 0.9 * 0.8)
    assert global_pair_counts(n_draws=50, seed=1) == global_pair_counts(n_draws=50, seed=1)
    with pytest.raises(ValueError):
        global_pair_counts(n_draws=0)


def test_global_pairs_figure():
    fig = global_pairs(random_image(40, 30), seeds=[0, 1, 2], size=16)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 6
    assert all("G1" in t and "blur" in t for t in titles[:3])  # top row: global 1, always blurred
    assert all("G2" in t and "solarize" not in titles[i] for i, t in enumerate(titles[3:]))
    with pytest.raises(ValueError):
        global_pairs(random_image(), seeds=[])


def test_blur_comparison_scales_sigma_with_the_crop():
    panels = blur_comparison(random_image(60, 50), pairs=((64, 16),), sigma=2.0)
    assert [img.size for _, img in panels] == [(64, 64), (16, 16), (16, 16)]
    assert "sigma 2" in panels[1][0] and "sigma 0.5" in panels[2][0]
    assert "3.1% of the side" in panels[0][0] and "12.5% of the side" in panels[1][0]
    # the paper's sigma on the small crop wipes out more of the random texture
    same_pixels, same_fraction = (np.asarray(img, dtype=float).std() for _, img in panels[1:])
    assert same_pixels < 0.7 * same_fraction


def test_draw_views_uses_the_given_blur_range():
    from dino_nb.notebook.views import draw_views

    sigmas = [
        v.blur_sigma
        for seed in range(5)
        for v in draw_views(
            random_image(),
            seed,
            n_local_crops=4,
            global_size=16,
            local_size=8,
            blur_sigma=(0.5, 0.6),
        )
        if v.blur_sigma is not None
    ]
    assert sigmas and all(0.5 <= s <= 0.6 for s in sigmas)
