import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

import dino_nb.fast.colour as colour
import dino_nb.fast.crops as ga
from dino_nb.augment import RATIO, DataAugmentation
from dino_nb.fast.colour import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
)
from dino_nb.fast.crops import DecodeResize, GPUMultiCrop, random_resized_boxes
from dino_nb.notebook.views import record_views


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smooth_image(size=32, seed=0):
    """A photo-like RGB image: bilinear-upsampled random colours plus a little noise."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
        (size, size), Image.BILINEAR
    )
    arr = np.clip(np.asarray(low, dtype=np.int16) + rng.integers(-10, 11, (size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


def torchvision_box(width, height, scale, ratio=RATIO):
    """One box ``(left, top, right, bottom)`` as ``RandomResizedCrop`` draws it (global generator)."""
    top, left, h, w = T.RandomResizedCrop.get_params(
        torch.empty(3, height, width), list(scale), list(ratio)
    )
    return left, top, left + w, top + h


def as_batch(img, n):
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    return t.unsqueeze(0).repeat(n, 1, 1, 1)


# ----------------------------------------------------------------------------- DecodeResize


def test_decode_resize_keeps_the_centre_square():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)  # (H, W): red | green | blue bands
    arr[:, :20, 0] = 255
    arr[:, 20:60, 1] = 255
    arr[:, 60:, 2] = 255
    out = DecodeResize(16)(Image.fromarray(arr))
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    inner = out[:, :, 1:-1]  # the resampling filter reaches one pixel past the box
    assert inner[1].min() == 255 and inner[0].max() == 0 and inner[2].max() == 0


def test_decode_resize_converts_mode_and_rejects_bad_canvas():
    assert DecodeResize(8)(Image.new("L", (10, 30), 7)).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="canvas"):
        DecodeResize(0)


def test_decode_resize_open_uses_jpeg_draft_but_keeps_short_side(tmp_path):
    path = tmp_path / "big.jpg"
    smooth_image(64).resize((400, 300)).save(path, quality=90)
    img = DecodeResize(64).open(str(path))
    assert (
        img.mode == "RGB" and min(img.size) >= 64 and img.size[0] < 400
    )  # decoded at a reduced scale


# ----------------------------------------------------------------------------- boxes


def test_boxes_are_integer_and_inside():
    b = random_resized_boxes(500, 30, 50, (0.05, 0.4), generator=torch.Generator().manual_seed(0))
    assert b.shape == (500, 4) and b.dtype == torch.float32
    assert torch.equal(b, b.round())
    assert (
        (b[:, 0] >= 0).all()
        and (b[:, 1] >= 0).all()
        and (b[:, 2] <= 50).all()
        and (b[:, 3] <= 30).all()
    )
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def test_boxes_fallback_matches_cpu_rule():
    # nothing with aspect in (2, 3) covering the whole square fits: centre crop of ratio 2
    b = random_resized_boxes(4, 40, 40, (1.0, 1.0), ratio=(2.0, 3.0))
    torch.manual_seed(0)
    assert b.tolist() == [list(map(float, torchvision_box(40, 40, (1.0, 1.0), (2.0, 3.0))))] * 4
    assert b[0].tolist() == [0.0, 10.0, 40.0, 30.0]


def test_boxes_follow_the_cpu_distribution():
    n, height, width, scale = 4000, 60, 80, (0.05, 0.4)
    g = random_resized_boxes(n, height, width, scale, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    c = torch.tensor([torchvision_box(width, height, scale) for _ in range(n)], dtype=torch.float32)
    area_g = ((g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) / (height * width)).numpy()
    area_c = ((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) / (height * width)).numpy()
    log_ar_g = torch.log((g[:, 2] - g[:, 0]) / (g[:, 3] - g[:, 1])).numpy()
    log_ar_c = torch.log((c[:, 2] - c[:, 0]) / (c[:, 3] - c[:, 1])).numpy()
    np.testing.assert_allclose(
        np.quantile(area_g, [0.1, 0.5, 0.9]), np.quantile(area_c, [0.1, 0.5, 0.9]), atol=0.015
    )
    assert (
        abs(log_ar_g.mean() - log_ar_c.mean()) < 0.02
        and abs(log_ar_g.std() - log_ar_c.std()) < 0.02
    )
    centre_g = ((g[:, 0] + g[:, 2]) / 2).mean().item()
    centre_c = ((c[:, 0] + c[:, 2]) / 2).mean().item()
    assert abs(centre_g - centre_c) < 1.0 and abs(centre_g - width / 2) < 1.0


# ----------------------------------------------------------------------------- colour ops vs torchvision


@pytest.mark.parametrize(
    "fn, ref, factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
        (adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2]),
        (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.07]),
    ],
)
def test_colour_ops_match_torchvision_per_sample(fn, ref, factors):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 9, 11)
    x[1, :, :2] = 0.5  # grey pixels: zero chroma
    out = fn(x.clone(), torch.tensor(factors))
    expected = torch.stack([ref(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_hue_half_turn_swaps_red_and_cyan():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(
        adjust_hue(red, torch.tensor([0.5])), torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)
    )


def test_blur_matches_torchvision_inside_and_skips_nan():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 24, 24)
    y = gaussian_blur(x, torch.tensor([0.7, float("nan"), 2.0]))
    torch.testing.assert_close(y[1], x[1])
    for i, s in ((0, 0.7), (2, 2.0)):
        ref = TF.gaussian_blur(x[i], kernel_size=13, sigma=s)
        torch.testing.assert_close(y[i, :, 6:-6, 6:-6], ref[:, 6:-6, 6:-6], atol=1e-5, rtol=0)
    const = torch.full((1, 3, 10, 10), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([1.5])), const)  # edges replicate


# ----------------------------------------------------------------------------- GPUMultiCrop


def test_shapes_dtypes_and_params():
    aug = GPUMultiCrop(n_local_crops=3, global_size=24, local_size=12, out_dtype=torch.bfloat16)
    crops, params = aug.views(as_batch(smooth_image(32), 5))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 24, 24)] * 2 + [(5, 3, 12, 12)] * 3
    assert all(c.dtype == torch.bfloat16 for c in crops) and aug.n_crops == 5
    assert [p.kind for p in params] == ["global"] * 2 + ["local"] * 3
    p = params[0]
    assert p.boxes.shape == (5, 4) and p.factors.shape == (5, 4) and p.blur_sigma.shape == (5,)
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(5, 4))
    assert torch.isfinite(p.blur_sigma).all()  # global 1 is always blurred
    assert not params[2].solarized.any()
    no_jitter = ~p.jittered
    assert torch.equal(
        p.factors[no_jitter], torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(int(no_jitter.sum()), 4)
    )


def test_from_augmentation_copies_settings():
    cpu = DataAugmentation((0.3, 0.9), (0.1, 0.3), 4, 64, 32)
    gpu = GPUMultiCrop.from_augmentation(cpu)
    assert (
        gpu.global_crops_scale,
        gpu.local_crops_scale,
        gpu.n_local_crops,
        gpu.global_size,
        gpu.local_size,
    ) == (
        (0.3, 0.9),
        (0.1, 0.3),
        4,
        64,
        32,
    )
    assert GPUMultiCrop(n_local_crops=0, global_size=16)(as_batch(smooth_image(20), 2))[
        1
    ].shape == (
        2,
        3,
        16,
        16,
    )


def test_generator_reproduces_and_global_rng_is_used():
    images = as_batch(smooth_image(32), 3)
    aug = GPUMultiCrop(n_local_crops=2, global_size=16, local_size=8)
    a = aug(images, torch.Generator().manual_seed(3))
    b = aug(images, torch.Generator().manual_seed(3))
    c = aug(images, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(5)
    d = aug(images)
    torch.manual_seed(5)
    e = aug(images)
    assert torch.equal(d[2], e[2])


def test_bad_input_is_rejected():
    aug = GPUMultiCrop(n_local_crops=1, global_size=8)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale"):
        GPUMultiCrop(global_crops_scale=(0.5, 0.2))


@pytest.fixture
def no_random_ops(monkeypatch):
    for name, value in (
        ("P_FLIP", 0.0),
        ("P_JITTER", 0.0),
        ("P_GRAYSCALE", 0.0),
        ("P_SOLARIZE", 0.0),
    ):
        monkeypatch.setattr(ga, name, value)
    monkeypatch.setattr(ga, "P_BLUR", (0.0, 0.0, 0.0))
    return monkeypatch


def test_full_crop_without_ops_is_the_image(no_random_ops):
    images = as_batch(smooth_image(32), 2)
    crops = GPUMultiCrop((1.0, 1.0), n_local_crops=0, global_size=32, normalize=False)(images)
    torch.testing.assert_close(crops[0], images.float() / 255, atol=1e-6, rtol=0)


@pytest.mark.parametrize("op", ["flip", "grayscale", "solarize"])
def test_forced_operations(no_random_ops, op):
    images = as_batch(smooth_image(32), 2)
    plain = images.float() / 255
    name = {"flip": "P_FLIP", "grayscale": "P_GRAYSCALE", "solarize": "P_SOLARIZE"}[op]
    no_random_ops.setattr(ga, name, 1.0)
    crops, params = GPUMultiCrop(
        (1.0, 1.0), n_local_crops=0, global_size=32, normalize=False
    ).views(images)
    if op == "flip":
        torch.testing.assert_close(crops[0], plain.flip(-1), atol=1e-6, rtol=0)
        assert params[0].flipped.all()
    elif op == "grayscale":
        assert torch.equal(crops[0][:, 0], crops[0][:, 1]) and torch.equal(
            crops[0][:, 1], crops[0][:, 2]
        )
        luma = 0.299 * plain[:, 0] + 0.587 * plain[:, 1] + 0.114 * plain[:, 2]
        torch.testing.assert_close(crops[0][:, 0], luma, atol=1e-5, rtol=0)
    else:  # solarization only on global 2
        torch.testing.assert_close(crops[0], plain, atol=1e-6, rtol=0)
        expected = torch.where(plain >= 128 / 255, 1 - plain, plain)
        torch.testing.assert_close(crops[1], expected, atol=1e-6, rtol=0)
        assert params[1].solarized.all() and not params[0].solarized.any()


def test_same_distribution_of_views_as_the_cpu_pipeline():
    """Frequencies of every augmentation per view kind, crop area and aspect, brightness.

    The CPU pipeline's views come with their records from ``record_views``, which gives
    ``DataAugmentation``'s views pixel for pixel (``test_views.py``).
    """
    n, size = 300, 32
    img = smooth_image(size)
    cpu = DataAugmentation(n_local_crops=2, global_size=16, local_size=8, normalize=False)
    gpu = GPUMultiCrop.from_augmentation(cpu)
    gpu.normalize = False
    torch.manual_seed(0)
    cpu_views = [record_views(cpu, img) for _ in range(n)]  # n x [g1, g2, l1, l2]
    gpu_crops, gpu_params = gpu.views(as_batch(img, n), torch.Generator().manual_seed(0))

    def freq_cpu(i, attr):
        return np.mean(
            [
                bool(getattr(v[i], attr)) if attr != "blur_sigma" else v[i].blur_sigma is not None
                for v in cpu_views
            ]
        )

    gpu_attr = {
        "flipped": "flipped",
        "jitter": "jittered",
        "grayscale": "grayscale",
        "blur_sigma": "blur_sigma",
        "solarized": "solarized",
    }
    for i in range(4):
        for attr, g_attr in gpu_attr.items():
            t = getattr(gpu_params[i], g_attr)
            g = (
                torch.isfinite(t).float().mean().item()
                if attr == "blur_sigma"
                else t.float().mean().item()
            )
            c = freq_cpu(i, attr)
            assert abs(g - c) < 4 * math.sqrt(0.25 / n) + 1e-9, (i, attr, g, c)  # 4 standard errors

    def area_aspect(boxes):
        b = np.asarray(boxes, dtype=np.float64)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return (w * h / size**2).mean(), np.log(w / h).mean()

    for i in range(4):
        a_c, r_c = area_aspect([v[i].box for v in cpu_views])
        a_g, r_g = area_aspect(gpu_params[i].boxes.numpy())
        assert abs(a_c - a_g) < 0.03 and abs(r_c - r_g) < 0.05, (i, a_c, a_g, r_c, r_g)

    # brightness: mean pixel value per view kind, within a few grey levels
    for i in range(4):
        m_c = np.mean([np.asarray(v[i].image, dtype=np.float64).mean() / 255 for v in cpu_views])
        m_g = gpu_crops[i].double().mean().item()
        assert abs(m_c - m_g) < 0.03, (i, m_c, m_g)


def test_cpu_colour_jitter_equals_each_sample_in_its_own_order():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 5, generator=g)
    jittered = torch.tensor([True, False, True, True, False, True])
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.8, 1.3, 0.9, -0.08]] * 3)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(6)])
    expected = x.clone()
    for i in range(6):  # one sample at a time, op after op in its order
        for op in order[i].tolist() if jittered[i] else []:
            expected[i : i + 1] = colour._JITTER_FNS[op](
                expected[i : i + 1], factors[i : i + 1, op]
            )
    out = colour.color_jitter(x, jittered, factors, order)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out[~jittered], x[~jittered])  # untouched, bit for bit


def test_the_accelerator_branches_give_the_cpu_branches_views(monkeypatch):
    # On the CPU, colour jitter and blur skip the samples that need no work (reading masks is
    # free there); on an accelerator they run branch-free, so the host never waits. Both must
    # draw the same views, up to float rounding (an op at its identity factor is not exact).
    images = as_batch(smooth_image(32), 6)
    aug = GPUMultiCrop(n_local_crops=2, global_size=16, local_size=8)
    on_cpu, cpu_params = aug.views(images, torch.Generator().manual_seed(0))
    monkeypatch.setattr(colour, "_sync_is_free", lambda device: False)
    branch_free, params = aug.views(images, torch.Generator().manual_seed(0))
    sigmas = [torch.stack([p.blur_sigma for p in ps]) for ps in (params, cpu_params)]
    torch.testing.assert_close(*sigmas, equal_nan=True, atol=0, rtol=0)  # the same draws
    for a, b in zip(branch_free, on_cpu, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_blur_sigma_range_carries_over_from_the_cpu_pipeline():
    cpu = DataAugmentation(n_local_crops=2, global_size=16, local_size=8, blur_sigma=(0.05, 0.5))
    gpu = GPUMultiCrop.from_augmentation(cpu)
    assert gpu.blur_sigma == (0.05, 0.5)
    _, params = gpu.views(as_batch(smooth_image(24), 200), torch.Generator().manual_seed(0))
    sigma = torch.cat([p.blur_sigma for p in params])
    sigma = sigma[torch.isfinite(sigma)]
    assert sigma.min() >= 0.05 and sigma.max() <= 0.5 and sigma.max() > 0.4
