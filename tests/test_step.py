"""Oracle tests for the step: the schedules (official ``cosine_scheduler`` semantics), clipping,
EMA, and the step itself against the paper's Algorithm 1."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_nb.model import Head, MultiCropWrapper, build_backbone
from dino_nb.step import (
    cancel_gradients,
    clip_gradients,
    cosine_schedule,
    ema_update,
    linear_warmup_schedule,
    param_groups,
)

# base 1.0 -> final 0.1 over 5 epochs of 4 iterations, 2 warmup epochs from 0.05
BASE, FINAL, START = 1.0, 0.1, 0.05


@pytest.fixture
def sched():
    return cosine_schedule(
        BASE, FINAL, epochs=5, niter_per_ep=4, warmup_epochs=2, start_warmup_value=START
    )


def test_length_and_dtype(sched):
    assert sched.shape == (20,)
    assert sched.dtype == np.float64
    assert len(cosine_schedule(1, 0, 7, 3)) == 21


def test_warmup_start_and_end(sched):
    assert sched[0] == pytest.approx(START)
    assert sched[7] == pytest.approx(BASE)  # last warmup iteration is the base value
    assert sched[8] == pytest.approx(BASE)  # and the cosine starts there too (official behaviour)
    # linear in between: 8 points from START to BASE, both included
    for i in range(8):
        assert sched[i] == pytest.approx(START + (BASE - START) * i / 7)


def test_official_formula_by_hand(sched):
    # cosine part: n = 20 - 8 = 12 iterations, value final + (base - final) * (1 + cos(pi i / n)) / 2
    assert sched[8 + 6] == pytest.approx(FINAL + 0.5 * (BASE - FINAL))  # cos(pi / 2) = 0
    assert sched[8 + 4] == pytest.approx(FINAL + 0.75 * (BASE - FINAL))  # cos(pi / 3) = 1 / 2
    assert sched[8 + 8] == pytest.approx(FINAL + 0.25 * (BASE - FINAL))  # cos(2 pi / 3) = -1 / 2
    assert sched[19] == pytest.approx(
        FINAL + 0.5 * (BASE - FINAL) * (1 + math.cos(math.pi * 11 / 12))
    )


def test_without_warmup_starts_at_base():
    s = cosine_schedule(0.04, 0.4, epochs=3, niter_per_ep=5)
    assert s[0] == pytest.approx(0.04)
    assert s[7] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 7 / 15)))
    assert np.all(np.diff(s) > 0)  # base < final: increasing (weight decay 0.04 -> 0.4)


def test_last_value_close_to_final_and_monotone_after_warmup():
    s = cosine_schedule(5e-4, 1e-6, epochs=100, niter_per_ep=10, warmup_epochs=10)
    assert s[-1] == pytest.approx(1e-6, abs=1e-5 * 5e-4)
    assert s[-1] > 1e-6  # the cosine approaches but does not reach the final value
    assert np.all(np.diff(s[:100]) > 0)
    assert np.all(np.diff(s[100:]) < 0)
    assert s.max() == pytest.approx(5e-4)


def test_teacher_momentum_towards_one():
    s = cosine_schedule(0.996, 1.0, epochs=10, niter_per_ep=10)
    assert s[0] == pytest.approx(0.996)
    assert np.all(np.diff(s) > 0) and s[-1] < 1.0 and s[-1] == pytest.approx(1.0, abs=1e-6)


def test_warmup_over_all_epochs():
    s = cosine_schedule(1.0, 0.0, epochs=2, niter_per_ep=3, warmup_epochs=2, start_warmup_value=0.0)
    np.testing.assert_allclose(s, np.linspace(0.0, 1.0, 6))


@pytest.mark.parametrize(
    "args",
    [
        dict(epochs=0, niter_per_ep=4),
        dict(epochs=-1, niter_per_ep=4),
        dict(epochs=4, niter_per_ep=0),
        dict(epochs=4, niter_per_ep=4, warmup_epochs=5),
        dict(epochs=4, niter_per_ep=4, warmup_epochs=-1),
    ],
)
def test_cosine_bad_args_raise(args):
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, **args)


def test_linear_warmup_ramp_and_plateau():
    s = linear_warmup_schedule(0.04, 0.07, epochs=5, niter_per_ep=4, warmup_epochs=2)
    assert s.shape == (20,)
    np.testing.assert_allclose(s[:8], [0.04 + 0.03 * i / 7 for i in range(8)])
    assert s[7] == pytest.approx(0.07)
    np.testing.assert_array_equal(s[8:], np.full(12, 0.07))


def test_linear_warmup_zero_and_fractional_warmup():
    np.testing.assert_array_equal(linear_warmup_schedule(0.04, 0.07, 3, 4, 0), np.full(12, 0.07))
    s = linear_warmup_schedule(0.04, 0.07, 3, 4, 0.5)  # 2 warmup iterations
    np.testing.assert_allclose(s, [0.04, 0.07] + [0.07] * 10)


def test_linear_warmup_longer_than_run_is_truncated_not_squeezed():
    # the paper's 30 warmup epochs in a 10-epoch run: the first 10 epochs of the same ramp
    s = linear_warmup_schedule(0.04, 0.07, epochs=10, niter_per_ep=2, warmup_epochs=30)
    full = np.linspace(0.04, 0.07, 60)
    np.testing.assert_allclose(s, full[:20])


@pytest.mark.parametrize("args", [(0, 4, 1), (4, 0, 1), (-2, 4, 1)])
def test_linear_warmup_bad_args_raise(args):
    with pytest.raises(ValueError):
        linear_warmup_schedule(0.04, 0.07, *args)


# ----------------------------------------------------------------------------- Schedules


def _recipe(**overrides):
    from dino_nb.tools.presets import preset

    return preset(
        "imagenette",
        **{
            "epochs": 10,
            "warmup_epochs": 2,
            "warmup_teacher_temp_epochs": 3,
            "freeze_last_layer": 1,
            **overrides,
        },
    )


def test_schedules_equal_the_official_arrays_over_the_recipe():
    from dino_nb.step import Schedules

    cfg = _recipe()
    n_per_epoch, batch = 7, 128
    s = Schedules(cfg, cfg.epochs * n_per_epoch, batch)
    lr = cosine_schedule(
        cfg.base_lr * batch / 256, cfg.min_lr, cfg.epochs, n_per_epoch, cfg.warmup_epochs
    )
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, n_per_epoch)
    m = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, n_per_epoch)
    temp = linear_warmup_schedule(
        cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.epochs, n_per_epoch, 3
    )
    assert len(s) == 70
    for i in range(70):
        v = s[i]
        assert (v.lr, v.weight_decay, v.momentum, v.teacher_temp) == (lr[i], wd[i], m[i], temp[i])
        assert v.freeze_last_layer == (i // n_per_epoch < cfg.freeze_last_layer)
    assert s.warmup_steps == 14


def test_schedules_stretch_with_the_step_count():
    """A time budget's step count keeps the recipe's shape: every phase is the same fraction."""
    from dino_nb.step import Schedules

    cfg = _recipe()
    short, long = Schedules(cfg, 100, 256), Schedules(cfg, 1000, 256)
    assert short.warmup_steps == 20 and long.warmup_steps == 200  # 2 of 10 epochs
    assert short.freeze_steps == 10 and long.freeze_steps == 100
    assert short[19].lr == pytest.approx(cfg.base_lr) and long[199].lr == pytest.approx(cfg.base_lr)
    assert (
        short[29].teacher_temp == pytest.approx(cfg.teacher_temp)
        and short[28].teacher_temp < cfg.teacher_temp
    )
    for s in (short, long):  # both end at the bottom of the cosine
        assert abs(s[len(s) - 1].lr - cfg.min_lr) < 1e-3 * cfg.base_lr
    assert short[500].lr == short[99].lr  # past the end: the last value
    with pytest.raises(ValueError, match="total_steps"):
        Schedules(cfg, 0, 256)


# --------------------------------------------------------------------------- test_optim


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


# ----------------------------------------------------------------------------- the step itself

#: A run small enough for a unit test: one block, 64 prototypes, 2 global + 2 local crops.
STEP_RUN = dict(
    model="vit_tiny_patch16_224",
    model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2},
    global_size=32,
    local_size=16,
    n_local_crops=2,
    batch_size=8,
    out_dim=64,
    hidden_dim=32,
    bottleneck_dim=16,
    drop_path_rate=0.1,  # the student draws drop-path masks: both runs must draw them alike
    clip_grad=0.05,  # small enough that some gradients are clipped
    minutes=None,
)


def _step_run(**overrides):
    from dino_nb.distributed import DistInfo
    from dino_nb.step import build_run
    from dino_nb.tools.presets import preset

    cfg = preset("cpu", **{**STEP_RUN, **overrides})
    return build_run(cfg, DistInfo(0, 1, 0, torch.device("cpu")), steps_per_epoch=5)


def _batches(n_steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
        + [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
        for _ in range(n_steps)
    ]


def _values(step: int):
    """Made-up values that all matter: lr > 0, a visible EMA, the last layer frozen at step 0."""
    from dino_nb.step import StepValues

    return StepValues(
        lr=1e-3,
        weight_decay=0.04 + 0.1 * step,
        momentum=0.9,
        teacher_temp=0.04 + 0.01 * step,
        freeze_last_layer=step == 0,
    )


def paper_step(run, crops, values, mistake: str = "") -> tuple[torch.Tensor, bool]:
    """Algorithm 1 of the paper, written again from its pseudo-code with plain torch.

    ``mistake`` makes it wrong on purpose (``"center first"``, ``"ema first"``,
    ``"same view"``), so that the test shows it would notice. Returns the loss and whether
    a gradient was clipped.
    """
    student, teacher, opt, center = run.student_module, run.teacher, run.optimizer, run.loss.center
    cfg = run.cfg
    opt.param_groups[0].update(lr=values.lr, weight_decay=values.weight_decay)
    opt.param_groups[1].update(lr=values.lr, weight_decay=0.0)  # biases and norms: no decay
    t_out = teacher(crops[:2])  # the teacher sees the 2 global views
    s_out = student(crops)  # the student every view

    def update_center():  # C <- m C + (1 - m) mean over the batch of the teacher's logits
        with torch.no_grad():
            center.copy_(
                cfg.center_momentum * center
                + (1 - cfg.center_momentum) * torch.cat(t_out).detach().mean(dim=0, keepdim=True)
            )

    if mistake == "center first":
        update_center()
    p_t = [F.softmax((t.detach() - center) / values.teacher_temp, dim=-1) for t in t_out]
    log_p_s = [F.log_softmax(s / cfg.student_temp, dim=-1) for s in s_out]
    pairs = [
        (i, j) for i in range(2) for j in range(len(crops)) if i != j or mistake == "same view"
    ]
    loss = sum((-p_t[i] * log_p_s[j]).sum(dim=-1).mean() for i, j in pairs) / len(pairs)
    opt.zero_grad()
    loss.backward()
    clipped = False
    for p in student.parameters():  # each gradient on its own, as the official clip_gradients
        if p.grad is not None:
            coef = cfg.clip_grad / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
                clipped = True
    if values.freeze_last_layer:
        for p in student.new_head.last_layer.parameters():
            p.grad = None

    def ema():  # teacher <- m teacher + (1 - m) student; lerp is t + (1 - m)(s - t)
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.lerp_(s, 1 - values.momentum)

    if mistake == "ema first":
        ema()
    opt.step()
    if mistake != "ema first":
        ema()
    if mistake != "center first":
        update_center()
    return loss.detach(), clipped


def _state(run) -> dict[str, torch.Tensor]:
    return {
        **{f"student.{k}": v for k, v in run.student_module.state_dict().items()},
        **{f"teacher.{k}": v for k, v in run.teacher.state_dict().items()},
        "center": run.loss.center,
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_step_is_the_papers_step_bit_for_bit():
    """train_step without extras == Algorithm 1 written from the paper: weights, center, loss."""
    from dino_nb.step import train_step

    batches = _batches(3)
    shipped = _step_run()
    assert shipped.extras.koleo_weight == 0 and not shipped.scaler.is_enabled()
    losses = [train_step(shipped, c, _values(i)).loss for i, c in enumerate(batches)]
    paper = _step_run()
    by_hand = [paper_step(paper, c, _values(i)) for i, c in enumerate(batches)]
    assert all(clipped for _, clipped in by_hand)  # the clipping was exercised
    assert _same(_state(shipped), _state(paper))
    assert [loss.item() for loss in losses] == [loss.item() for loss, _ in by_hand]
    fresh = _step_run()
    assert not torch.equal(fresh.loss.center, shipped.loss.center)  # the center moved
    assert not _same(_state(fresh), _state(shipped))


@pytest.mark.parametrize("mistake", ["center first", "ema first", "same view"])
def test_the_papers_step_notices_a_step_in_the_wrong_order(mistake):
    """The reference above would catch train_step doing any of these."""
    from dino_nb.step import train_step

    batches = _batches(2)
    shipped = _step_run()
    for i, crops in enumerate(batches):
        train_step(shipped, crops, _values(i))
    wrong = _step_run()
    for i, crops in enumerate(batches):
        paper_step(wrong, crops, _values(i), mistake)
    assert not _same(_state(shipped), _state(wrong))


def test_the_loss_scaler_only_scales():
    """An enabled loss scaler (the fp16 piece), here in fp32: its powers of two cancel exactly.

    It would not if the gradients were clipped before they are unscaled.
    """
    from dino_nb.step import train_step

    batches = _batches(2)
    plain, scaled = _step_run(), _step_run()
    scaled.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    for i, crops in enumerate(batches):
        train_step(plain, crops, _values(i))
        train_step(scaled, crops, _values(i))
    assert scaled.scaler.get_scale() == 2.0**10  # no overflow, so no skipped step
    assert _same(_state(plain), _state(scaled))


def test_koleo_is_a_piece_of_the_objective():
    """Extras.objective: the loss alone without KoLeo; with it, loss + w * KoLeo of the 2 global views."""
    from dino_nb.loss import koleo_loss
    from dino_nb.step import Extras

    loss = torch.tensor(2.0)
    features = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    objective, extra = Extras().objective(loss, features)
    assert objective is loss and extra == {}
    objective, extra = Extras(koleo_weight=0.5).objective(loss, features)
    koleo = koleo_loss(features[0]) + koleo_loss(features[1])
    assert torch.equal(extra["koleo"], koleo)
    assert torch.equal(objective, loss + 0.5 * koleo)
