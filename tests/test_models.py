"""Tests for timm backbones and the student/teacher pair."""

import copy

import pytest
import torch
from timm.layers import DropPath

from dino_nb.checkpoint import save_atomic
from dino_nb.model import (
    Head,
    MultiCropWrapper,
    backbone_from_checkpoint,
    build_backbone,
    build_student_teacher,
    is_vit,
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
