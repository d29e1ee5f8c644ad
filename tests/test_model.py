"""Tests for timm backbones and the student/teacher pair."""

import copy

import pytest
import timm
import torch
from timm.layers import DropPath
from torch import nn

from dino_nb.checkpoint import save_atomic
from dino_nb.model import (
    Head,
    MultiCropWrapper,
    backbone_from_checkpoint,
    build_backbone,
    build_student_teacher,
    is_vit,
    resolution_groups,
)

TINY = dict(img_size=32, patch_size=8, depth=1)


def test_unknown_name_suggests_close_matches():
    # the tutorial's name, gone from timm
    with pytest.raises(ValueError) as info:
        build_backbone("vit_deit_small_patch16_224")
    msg = str(info.value)
    assert "vit_deit_small_patch16_224" in msg and "did you mean" in msg
    assert "deit_small_patch16_224" in msg.split("did you mean")[1]


def test_unknown_name_far_from_everything_lists_suggested_models():
    with pytest.raises(ValueError) as info:
        build_backbone("qqqqqqqq")
    assert "vit_small_patch16_224" in str(info.value)


def test_backbone_returns_pooled_embedding_at_any_size():
    b = build_backbone("vit_tiny_patch16_224", **TINY).eval()
    assert is_vit(b) and b.num_classes == 0 and b.num_features == 192
    with torch.no_grad():
        assert b(torch.randn(2, 3, 32, 32)).shape == (2, b.num_features)
        assert b(torch.randn(3, 3, 16, 16)).shape == (3, b.num_features)  # dynamic_img_size


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return build_student_teacher(
        "vit_tiny_patch16_224",
        16,
        hidden_dim=32,
        bottleneck_dim=8,
        norm_last_layer=True,
        drop_path_rate=0.1,
        model_kwargs=dict(TINY, depth=2),
    )


def test_teacher_starts_as_a_copy_of_the_student(pair):
    student, teacher = pair
    assert isinstance(student, MultiCropWrapper) and isinstance(teacher, MultiCropWrapper)
    assert isinstance(student.new_head, Head)
    s, t = student.state_dict(), teacher.state_dict()
    assert s.keys() == t.keys()
    for k in s:
        assert torch.equal(s[k], t[k]), k
        assert s[k].data_ptr() != t[k].data_ptr(), k  # copies, not shared storage


def test_teacher_is_frozen_and_student_trainable(pair):
    student, teacher = pair
    assert not any(p.requires_grad for p in teacher.parameters())
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    assert frozen == ["new_head.last_layer.parametrizations.weight.original0"]  # norm_last_layer
    assert len(trainable) > 10


def test_drop_path_only_in_the_student(pair):
    student, teacher = pair
    drops = [m for m in student.modules() if isinstance(m, DropPath)]
    assert drops and all(m.drop_prob > 0 for m in drops)
    assert not any(isinstance(m, DropPath) for m in teacher.modules())
    # in eval mode drop path is off, so both compute the same function
    x = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        for a, b in zip(student.eval()(x), teacher.eval()(x), strict=True):
            torch.testing.assert_close(a, b)
    student.train()


def test_backbone_from_checkpoint(tmp_path, pair):
    student, _ = pair
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.backbone.cls_token.add_(1.0)  # make the two differ
    path = save_atomic(
        {
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "config": {"model": "vit_tiny_patch16_224", "model_kwargs": dict(TINY, depth=2)},
        },
        tmp_path / "checkpoint.pth",
    )
    x = torch.randn(2, 3, 32, 32)
    for which, model in (("teacher", teacher), ("student", student)):
        b = backbone_from_checkpoint(str(path), which=which)
        assert not b.training
        with torch.no_grad():
            torch.testing.assert_close(b(x), model.backbone.eval()(x))
    with torch.no_grad():  # both in eval mode now: they differ by the cls_token shift only
        assert not torch.allclose(teacher.backbone(x), student.backbone(x))
    student.train()
    with pytest.raises(ValueError):
        backbone_from_checkpoint(str(path), which="both")


def test_student_teacher_from_config_uses_every_head_field():
    from dataclasses import replace

    from dino_nb.model import student_teacher_from_config, unwrap_backbone
    from dino_nb.tools.presets import preset

    cfg = replace(
        preset("cpu"),
        model="vit_tiny_patch16_224",
        model_kwargs=dict(TINY, depth=2),  # one block gets drop-path rate 0
        out_dim=16,
        hidden_dim=24,
        bottleneck_dim=8,
        head_layers=2,
        drop_path_rate=0.1,
    )
    student, teacher = student_teacher_from_config(cfg)
    linears = [m for m in student.new_head.mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [24, 8]  # head_layers=2: hidden, bottleneck
    assert student.new_head.last_layer.out_features == 16
    assert any(isinstance(m, DropPath) for m in student.modules())
    assert not any(isinstance(m, DropPath) for m in teacher.modules())
    assert (
        unwrap_backbone(student) is student.backbone
        and unwrap_backbone(student.backbone) is student.backbone
    )


# --------------------------------------------------------------------------- test_head


def make_head(**kwargs) -> Head:
    torch.manual_seed(0)
    kw = dict(
        in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=6, n_layers=3, norm_last_layer=False
    )
    kw.update(kwargs)
    return Head(**kw)


def row_norms(head: Head) -> torch.Tensor:
    return torch.linalg.vector_norm(head.last_layer.weight, dim=1)  # (out_dim,)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_output_shape_and_layer_count(n_layers):
    head = make_head(n_layers=n_layers)
    assert head(torch.randn(5, 12)).shape == (5, 20)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == n_layers
    assert linears[0].in_features == 12 and linears[-1].out_features == 6
    if n_layers > 1:
        assert all(m.out_features == 16 for m in linears[:-1])
        assert sum(isinstance(m, nn.GELU) for m in head.mlp.modules()) == n_layers - 1


@pytest.mark.parametrize("n_layers", [0, -1])
def test_no_layers_raises(n_layers):
    with pytest.raises(ValueError, match="n_layers"):
        make_head(n_layers=n_layers)


def test_forward_is_mlp_then_l2_normalise_then_weight_normalised_linear():
    head = make_head()
    with torch.no_grad():
        head.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(4, 12, dtype=torch.float64)
    head = head.double()
    z = head.mlp(x)
    z = z / torch.sqrt((z**2).sum(dim=1, keepdim=True))  # (4, bottleneck)
    g, v = head.weight_g, head.weight_v  # (out, 1), (out, bottleneck)
    w = g * v / torch.sqrt((v**2).sum(dim=1, keepdim=True))
    torch.testing.assert_close(head.last_layer.weight, w)
    torch.testing.assert_close(head(x), z @ w.T)


def test_last_layer_parameters_and_state_dict_keys():
    head = make_head()
    assert head.weight_g.shape == (20, 1) and head.weight_v.shape == (20, 6)
    assert head.last_layer.bias is None
    keys = set(head.state_dict())
    assert {
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    } <= keys
    # g starts at 1 whatever norm_last_layer says (as the official code does)
    for norm in (False, True):
        h = make_head(norm_last_layer=norm)
        torch.testing.assert_close(h.weight_g, torch.ones(20, 1))
        torch.testing.assert_close(row_norms(h), torch.ones(20))


def test_mlp_init_zero_biases():
    head = make_head()
    for m in head.mlp.modules():
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
            assert m.weight.std() < 0.05


def step(head: Head, lr: float = 0.5) -> None:
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=lr)
    x = torch.randn(8, 12)
    loss = (head(x) * torch.randn(8, 20)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_norm_last_layer_keeps_norm_one_and_g_frozen():
    head = make_head(norm_last_layer=True)
    assert head.norm_last_layer
    assert not head.weight_g.requires_grad and head.weight_v.requires_grad
    g0, v0 = head.weight_g.detach().clone(), head.weight_v.detach().clone()
    for _ in range(3):
        step(head)
    assert head.weight_g.grad is None
    assert torch.equal(head.weight_g, g0)
    assert not torch.allclose(head.weight_v, v0)
    torch.testing.assert_close(row_norms(head), torch.ones(20))


def test_without_norm_last_layer_g_is_trained():
    head = make_head(norm_last_layer=False)
    assert head.weight_g.requires_grad
    g0 = head.weight_g.detach().clone()
    step(head)
    assert head.weight_g.grad is not None
    assert not torch.allclose(head.weight_g, g0)
    # ||g v / ||v|| || = |g|: a g that a step pushed below 0 flips its row, keeps the norm
    torch.testing.assert_close(row_norms(head), head.weight_g.detach().abs().squeeze(1))


def test_batchnorm_after_each_hidden_linear_as_the_official_head():
    head = Head(16, 10, hidden_dim=32, bottleneck_dim=8, n_layers=3, use_bn=True)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.GELU,
        nn.Linear,
        nn.BatchNorm1d,
        nn.GELU,
        nn.Linear,
    ]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in Head(16, 10, n_layers=3).mlp.modules())


def test_batchnorm_lets_small_differences_between_images_reach_the_prototypes():
    """Embeddings that share a large common part (a fresh backbone's) give near-equal outputs,
    unless the head standardises each feature over the batch."""
    torch.manual_seed(0)
    common = torch.randn(1, 64) * 10
    x = common + 0.01 * torch.randn(32, 64)  # (32, 64): 32 images, nearly the same embedding

    def spread(head: nn.Module) -> float:
        head.train()
        logits = head(x)  # (32, K)
        return (logits - logits.mean(0)).std().item()  # how much the images differ

    plain = spread(Head(64, 128, hidden_dim=64, bottleneck_dim=32))
    with_bn = spread(Head(64, 128, hidden_dim=64, bottleneck_dim=32, use_bn=True))
    assert with_bn > 20 * plain


# --------------------------------------------------------------------------- test_multicrop


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
