"""Oracle tests for per-tensor gradient clipping, parameter groups and the EMA update."""

import pytest
import torch
from torch import nn

from dino_nb.model import Head, MultiCropWrapper, build_backbone
from dino_nb.step import cancel_gradients, clip_gradients, ema_update, param_groups


def model_with_grads(norms):
    """A module with one parameter per entry of ``norms``, its gradient of exactly that L2 norm."""
    m = nn.ParameterList([nn.Parameter(torch.zeros(3, 4)) for _ in norms])
    g = torch.Generator().manual_seed(0)
    for p, n in zip(m, norms, strict=True):
        d = torch.randn(3, 4, generator=g, dtype=torch.float64)
        p.grad = (d / d.norm() * n).float()
    return m


def test_clip_per_tensor_against_hand_computation():
    clip = 2.0
    m = model_with_grads([5.0, 1.0, 0.5, 30.0])
    before = [p.grad.clone() for p in m]
    norms = clip_gradients(m, clip)
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0, 0.5, 30.0]))  # pre-clip norms
    for p, g, n in zip(m, before, [5.0, 1.0, 0.5, 30.0], strict=True):
        expected = g * min(1.0, clip / (n + 1e-6))
        torch.testing.assert_close(p.grad, expected)
        assert p.grad.norm() <= clip + 1e-5
    # below clip: untouched
    assert torch.equal(m[1].grad, before[1]) and torch.equal(m[2].grad, before[2])
    # each tensor on its own: the large one does not shrink the others (unlike clip_grad_norm_)
    assert m[0].grad.norm() == pytest.approx(2.0, rel=1e-5)


def test_clip_skips_parameters_without_gradient():
    m = model_with_grads([5.0, 1.0])
    m.append(nn.Parameter(torch.ones(2)))
    norms = clip_gradients(m, 3.0)
    assert norms.shape == (2,)
    assert m[2].grad is None
    assert clip_gradients(nn.Linear(2, 2), 1.0).numel() == 0


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_clip_must_be_positive(clip):
    with pytest.raises(ValueError):
        clip_gradients(model_with_grads([1.0]), clip)


def test_param_groups_on_a_vit_with_head():
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    model = MultiCropWrapper(
        backbone, Head(backbone.num_features, 16, hidden_dim=32, bottleneck_dim=8)
    )
    groups = param_groups(model)
    assert len(groups) == 2
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, p in model.named_parameters()}
    g_name = "new_head.last_layer.parametrizations.weight.original0"
    assert g_name in no_decay  # g is 2-D (out_dim, 1) yet not decayed
    assert "new_head.last_layer.parametrizations.weight.original1" in decay
    for n in no_decay:
        p = dict(model.named_parameters())[n]
        assert p.ndim <= 1 or n == g_name, n
    for n, _ in model.named_parameters():
        if n.endswith(".bias") or "norm" in n.split(".")[-2]:
            assert n in no_decay, n
    assert "backbone.blocks.0.attn.qkv.weight" in decay
    assert "new_head.mlp.0.weight" in decay
    assert "backbone.norm.weight" in no_decay and "backbone.blocks.0.norm1.bias" in no_decay


def test_param_groups_skip_frozen_parameters():
    head = Head(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    params = [p for g in param_groups(head) for p in g["params"]]
    assert all(p is not head.weight_g for p in params)
    assert len(params) == sum(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("m", [0.0, 0.3, 0.996, 1.0])
def test_ema_update_equals_formula(m):
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    ema_update(teacher, student, m)
    for p, t, s in zip(teacher.parameters(), t0, s0, strict=True):
        torch.testing.assert_close(p.detach(), m * t + (1 - m) * s)
    for p, s in zip(student.parameters(), s0, strict=True):
        assert torch.equal(p.detach(), s)  # student untouched


def test_cancel_gradients():
    m = model_with_grads([1.0, 2.0])
    cancel_gradients(m.parameters())
    assert all(p.grad is None for p in m)
