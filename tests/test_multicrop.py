"""Oracle tests for the multi-crop wrapper: grouped passes equal per-crop passes."""

import pytest
import timm
import torch

from dino_nb.model import Head, MultiCropWrapper, build_backbone, resolution_groups


@pytest.fixture(scope="module")
def wrapper():
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    head = Head(backbone.num_features, 16, hidden_dim=32, bottleneck_dim=8)
    return MultiCropWrapper(backbone, head).eval()


def crops(n: int = 2, sizes=(32, 32, 16, 16, 16), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s, s, generator=g) for s in sizes]


def test_returns_tuple_of_per_crop_logits(wrapper):
    with torch.no_grad():
        out = wrapper(crops())
    assert isinstance(out, tuple) and len(out) == 5
    assert all(o.shape == (2, 16) for o in out)


def test_mixed_resolutions_equal_each_crop_alone(wrapper):
    x = crops(n=3, sizes=(32, 32, 16, 16, 16, 24))
    with torch.no_grad():
        together = wrapper(x)
        for c, t in zip(x, together, strict=True):
            alone = wrapper([c])
            assert len(alone) == 1
            torch.testing.assert_close(t, alone[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                t, wrapper.new_head(wrapper.backbone(c)), atol=1e-5, rtol=1e-4
            )
            # a bare tensor counts as one crop
            torch.testing.assert_close(t, wrapper(c)[0], atol=1e-5, rtol=1e-4)


def test_one_backbone_pass_per_resolution(wrapper):
    batches = []
    handle = wrapper.backbone.register_forward_hook(
        lambda m, i, o: batches.append(tuple(i[0].shape))
    )
    try:
        with torch.no_grad():
            wrapper(crops(n=2, sizes=(32, 32, 16, 16, 16)))
    finally:
        handle.remove()
    assert batches == [(4, 3, 32, 32), (6, 3, 16, 16)]


def test_resolution_groups():
    def t(*hw):
        return torch.zeros(1, 3, *hw)

    assert resolution_groups([t(8, 8), t(8, 8), t(4, 4), t(4, 4), t(4, 4)]) == [(0, 2), (2, 5)]
    assert resolution_groups([t(8, 8), t(4, 4), t(8, 8)]) == [(0, 1), (1, 2), (2, 3)]
    assert resolution_groups([t(8, 4), t(4, 8)]) == [(0, 1), (1, 2)]
    assert resolution_groups([t(8, 8)]) == [(0, 1)]
    assert resolution_groups([]) == []
    # only the spatial size matters, not the batch
    assert resolution_groups([torch.zeros(2, 3, 8, 8), torch.zeros(5, 3, 8, 8)]) == [(0, 2)]


def test_mismatched_batch_sizes_raise(wrapper):
    x = crops(n=2)
    x[3] = x[3][:1]
    with pytest.raises(ValueError, match="same number of samples"):
        wrapper(x)


def test_backbone_classifier_is_removed():
    backbone = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10
    )
    w = MultiCropWrapper(
        backbone, Head(backbone.num_features, 16, hidden_dim=32, bottleneck_dim=8)
    ).eval()
    assert w.backbone.num_classes == 0
    with torch.no_grad():
        assert w([torch.randn(2, 3, 32, 32)])[0].shape == (2, 16)
