import pytest
import torch

from dino_nb.model import build_backbone
from dino_nb.notebook.attention import (
    cls_attention_maps,
    embeds_class_token,
    last_block_attention,
    patch_grid,
    threshold_mask,
    upsample,
)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()


@pytest.fixture(scope="module")
def vit_reg():
    torch.manual_seed(1)
    return build_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, reg_tokens=2
    ).eval()


def test_full_attention_rows_sum_to_one(vit):
    x = torch.randn(2, 3, 32, 32)
    attn = last_block_attention(vit, x)
    n_tokens = 1 + 4 * 4
    assert attn.shape == (2, vit.blocks[-1].attn.num_heads, n_tokens, n_tokens)
    assert torch.allclose(attn.sum(-1), torch.ones(2, attn.shape[1], n_tokens), atol=1e-5)
    assert (attn >= 0).all()


def test_model_output_and_flags_unchanged(vit):
    x = torch.randn(3, 3, 32, 32)
    flags = [b.attn.fused_attn for b in vit.blocks]
    vit.train()  # mode must be restored too
    with torch.no_grad():
        vit.eval()
        before = vit(x)
        vit.train()
    cls_attention_maps(vit, x)
    assert vit.training
    vit.eval()
    with torch.no_grad():
        after = vit(x)
    assert torch.equal(before, after)
    assert [b.attn.fused_attn for b in vit.blocks] == flags
    assert all(len(b.attn._forward_pre_hooks) == 0 for b in vit.blocks)


def _manual_attention(model, x):
    """Oracle: timm's own unfused branch, softmax read from a hook on attn_drop."""
    flags = [b.attn.fused_attn for b in model.blocks]
    got = []
    handle = model.blocks[-1].attn.attn_drop.register_forward_hook(
        lambda m, i, o: got.append(o.detach())
    )
    try:
        for b in model.blocks:
            b.attn.fused_attn = False
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        for b, f in zip(model.blocks, flags, strict=True):
            b.attn.fused_attn = f
    return got[0]


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_matches_unfused_timm_computation(vit, size):
    x = torch.randn(2, 3, *size)
    expected = _manual_attention(vit, x)
    assert torch.allclose(last_block_attention(vit, x), expected, atol=1e-6)


def test_cls_maps_grid_follows_input_size_and_prefix_tokens(vit, vit_reg):
    x = torch.randn(1, 3, 48, 40)  # dynamic_img_size: 6 x 5 patches of 8 px
    maps = cls_attention_maps(vit, x)
    assert maps.shape == (1, 3, 6, 5)
    assert patch_grid(vit, 48, 40) == (6, 5)
    full = last_block_attention(vit, x)
    assert torch.allclose(maps.flatten(-2), full[:, :, 0, 1:])

    assert vit_reg.num_prefix_tokens == 3
    maps = cls_attention_maps(vit_reg, x)
    full = last_block_attention(vit_reg, x)
    assert full.shape[-1] == 3 + 30
    assert maps.shape == (1, 3, 6, 5)
    assert torch.allclose(maps.flatten(-2), full[:, :, 0, 3:])
    assert (maps.sum((-2, -1)) < 1).all()


def test_refuses_cls_maps_of_a_model_that_pools_its_patch_tokens(vit):
    pooled = build_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="avg"
    ).eval()
    assert embeds_class_token(vit) and not embeds_class_token(pooled)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        cls_attention_maps(pooled, torch.randn(1, 3, 32, 32))


def test_rejects_non_vit():
    with pytest.raises(ValueError, match="Vision Transformer"):
        last_block_attention(torch.nn.Linear(3, 3), torch.randn(1, 3, 8, 8))


def test_threshold_mask_keeps_requested_mass():
    torch.manual_seed(0)
    maps = torch.rand(4, 3, 5, 6) ** 3
    for threshold in (0.3, 0.6, 0.9):
        mask = threshold_mask(maps, threshold)
        assert mask.shape == maps.shape and mask.dtype == torch.bool
        p = maps / maps.sum((-2, -1), keepdim=True)
        kept = (p * mask).sum((-2, -1))
        assert (kept >= threshold - 1e-6).all()
        # minimal: without its smallest kept patch the mass falls below the threshold
        smallest = torch.where(mask, p, torch.full_like(p, 2.0)).flatten(-2).min(-1).values
        assert (kept - smallest < threshold).all()
        # the kept patches are the largest ones
        largest_dropped = torch.where(mask, torch.full_like(p, -1.0), p).flatten(-2).max(-1).values
        assert (largest_dropped <= smallest).all()


def test_threshold_mask_hand_example():
    maps = torch.tensor([[0.5, 0.2], [0.2, 0.1]])
    assert threshold_mask(maps, 0.6).tolist() == [[True, True], [False, False]] or threshold_mask(
        maps, 0.6
    ).tolist() == [[True, False], [True, False]]
    assert threshold_mask(maps, 0.5).tolist() == [[True, False], [False, False]]
    assert threshold_mask(maps, 1.0).all()
    with pytest.raises(ValueError):
        threshold_mask(maps, 0.0)


def test_upsample():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    up = upsample(m, (4, 6))
    assert up.shape == (4, 6)
    assert up[0, 0] == 1 and up[3, 5] == 4 and up[0, 5] == 2
    up = upsample(torch.rand(2, 3, 2, 2) > 0.5, (8, 8), "bilinear")
    assert up.shape == (2, 3, 8, 8) and up.dtype == torch.float32
    with pytest.raises(ValueError):
        upsample(m, (4, 4), "bicubic")


def test_accepts_multicrop_wrapper(vit):
    from dino_nb.model import Head, MultiCropWrapper

    x = torch.randn(1, 3, 32, 32)
    wrapped = MultiCropWrapper(vit, Head(vit.num_features, 8, 16, 4, 2))
    assert torch.equal(cls_attention_maps(wrapped, x), cls_attention_maps(vit, x))
