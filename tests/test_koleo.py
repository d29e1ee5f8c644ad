"""The KoLeo regulariser: values by hand, invariances, its gradient, and its place in the step."""

from __future__ import annotations

import math

import pytest
import torch

from dino_nb.loss import koleo_loss
from dino_nb.model import MultiCropWrapper


def test_equals_hand_computation_on_a_circle():
    # unit vectors at 0, 10 and 90 degrees: the nearest neighbours are 10, 0 and 10 degrees away,
    # 10, 10 and 80 degrees; a chord of angle a has length 2 sin(a / 2)
    angles = torch.tensor([0.0, 10.0, 90.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5]])
    chords = [2 * math.sin(math.radians(a) / 2) for a in (10, 10, 80)]
    expected = -sum(math.log(c) for c in chords) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_ignores_scale_and_order_and_is_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    value = koleo_loss(x)
    assert torch.allclose(koleo_loss(7 * x), value)
    assert torch.allclose(koleo_loss(x[torch.randperm(16, generator=g)]), value)
    assert koleo_loss(x.to(torch.bfloat16)).dtype == torch.float32


def test_crowded_embeddings_cost_more_and_the_gradient_spreads_them():
    g = torch.Generator().manual_seed(1)
    spread = torch.randn(32, 16, generator=g)
    crowded = torch.randn(1, 16, generator=g) + 0.05 * spread
    assert koleo_loss(crowded) > koleo_loss(spread) + 1.0
    x = crowded.clone().requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        assert koleo_loss(x - 0.01 * x.grad) < koleo_loss(crowded)  # one descent step
    same = koleo_loss(torch.ones(4, 3))  # identical embeddings: large, but finite
    assert torch.isfinite(same) and same > 10


@pytest.mark.parametrize("shape", [(1, 8), (8,), (2, 3, 4)])
def test_refuses_what_has_no_neighbours(shape):
    with pytest.raises(ValueError, match="koleo_loss needs"):
        koleo_loss(torch.randn(*shape))


def test_the_wrapper_returns_the_embeddings_the_head_reads():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(6))
    head = torch.nn.Linear(6, 5)
    model = MultiCropWrapper(backbone, head)
    crops = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    logits, embeddings = model(crops, return_embeddings=True)
    plain = model(crops)
    assert len(embeddings) == 2 and all(e.shape == (4, 6) for e in embeddings)
    assert all(torch.equal(a, b) for a, b in zip(logits, plain, strict=True))
    assert torch.allclose(embeddings[1], backbone(crops[1]))
    assert all(torch.allclose(head(e), lo) for e, lo in zip(embeddings, logits, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nearest_neighbour_is_found_in_float32_under_autocast(dtype):
    # Embeddings of a crowded batch differ by ~1e-3: their cosines all round to the same
    # half-precision number near 1 (spacing 2^-11 in fp16, 2^-8 in bf16), so a neighbour
    # search run by autocast in half precision picks a wrong neighbour for most rows (97% of
    # them over 20 seeds before the search was kept in float32) and the loss drops.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 192, generator=g) + 1e-3 * torch.randn(64, 192, generator=g)  # (64, 192)
    expected = koleo_loss(x)
    with torch.autocast("cpu", dtype=dtype):
        under_autocast = koleo_loss(x)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=1e-5, atol=0)
