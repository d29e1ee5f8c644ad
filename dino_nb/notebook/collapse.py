r"""The collapse study: why DINO needs centering, sharpening and a momentum teacher (Caron et al. 2021).

Self-distillation has two trivial solutions. The teacher's output can become **uniform**
(every prototype equally likely, entropy :math:`\log K`) or **one-hot on one dimension**
(entropy 0), whatever the input. Either way the student copies it perfectly, the
teacher-student KL divergence drops to zero, and the features carry no information.

* Centering (subtract an EMA of the teacher's mean logits) stops one dimension from
  dominating, but pushes towards the uniform distribution.
* Sharpening (a low teacher temperature :math:`\tau_t < \tau_s`) does the opposite.

The paper's collapse study shows both failure modes; :func:`collapse_study` reproduces it in
seconds on a CPU with a tiny MLP on random vectors (not a ViT on images): the point is the
dynamics of the loss, not the features. With only centering the teacher entropy rises to
:math:`\log K`, with only sharpening it falls to 0 and the whole batch shares one dimension;
either way the KL falls towards 0. With both, the KL stays clearly above 0.

The toy runs in float64 by default, so that its printed numbers do not depend on the CPU:
the arm without a momentum teacher oscillates, and in float32 the kernels' rounding (which
differs between, e.g., AVX-512 and plain kernels) decides its curves after a few hundred
steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from ..loss import Loss, batch_mean_entropy, mean_entropy, teacher_student_kl
from ..model import Head, MultiCropWrapper
from ..step import ema_update
from .figures import new_figure


@dataclass(frozen=True)
class CollapseSetting:
    """One arm of the study.

    Attributes:
        name: label for legends.
        centering: subtract the EMA center (``center_momentum``); off keeps the center at 0.
        sharpening: use the low teacher temperature; off sets it to the student's.
        momentum: the teacher is an EMA of the student (``teacher_momentum``); off copies the
            student into the teacher after every step (momentum 0), the paper's "student
            copy" teacher.
    """

    name: str
    centering: bool
    sharpening: bool
    momentum: bool = True


#: The paper's three arms (both, centering only, sharpening only), and DINO without its
#: momentum teacher (teacher = student after every step).
SETTINGS = (
    CollapseSetting("centering + sharpening", True, True),
    CollapseSetting("centering only", True, False),
    CollapseSetting("sharpening only", False, True),
    CollapseSetting("no momentum teacher", True, True, momentum=False),
)


@dataclass
class CollapseRun:
    r"""Per-step curves of one arm.

    Attributes:
        setting: the arm.
        entropy: mean entropy of the teacher's (centred, sharpened) output per step, in nats
            (the paper's Fig. 7, left).
        batch_entropy: entropy of the teacher's output averaged over the batch, per step: near
            0 when every sample's target is the same one dimension (one-dimension collapse),
            high when samples use different dimensions.
        kl: mean KL divergence ``KL(P_t || P_s)`` between teacher and student per step, in nats.
        loss: the DINO loss per step (cross-entropy = entropy + KL).
        max_entropy: :math:`\log K`, the entropy of the uniform distribution.
        targets: the trained teacher's targets for each of the 2,048 toy samples (no
            augmentation), ``(2048, K)``.
        clusters: the Gaussian cluster each sample was drawn from, ``(2048,)``.
    """

    setting: CollapseSetting
    entropy: list[float] = field(default_factory=list)
    batch_entropy: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    max_entropy: float = 0.0
    targets: torch.Tensor | None = field(default=None, repr=False)
    clusters: torch.Tensor | None = field(default=None, repr=False)


#: Gaussian clusters in the toy data: the groups that the prototypes may split or merge.
N_CLUSTERS = 8


def _toy_data(
    n_samples: int, dim: int, n_clusters: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters in ``dim`` dimensions: samples ``(n_samples, dim)``, clusters ``(n_samples,)``."""
    centers = (
        torch.randn(n_clusters, dim, generator=generator, dtype=dtype) * 2.0
    )  # (n_clusters, dim)
    which = torch.randint(0, n_clusters, (n_samples,), generator=generator)
    return centers[which] + torch.randn(n_samples, dim, generator=generator, dtype=dtype), which


def _two_views(
    x: torch.Tensor, generator: torch.Generator, noise: float, drop: float
) -> list[torch.Tensor]:
    """Two "augmented" views: additive noise and random feature dropout, each ``(batch, dim)``."""
    views = []
    for _ in range(2):
        keep = (torch.rand(x.shape, generator=generator) >= drop).to(x.dtype)
        noise_ = torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise
        views.append((x + noise_) * keep)
    return views


def _toy_student(out_dim: int, seed: int, dtype: torch.dtype) -> MultiCropWrapper:
    """A 2-layer MLP backbone (32 -> 64) with a DINO head, initialised from ``seed`` in ``dtype``."""
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # initialise in the run's dtype (a float32 init cast up would carry the kernels' rounding)
        torch.set_default_dtype(dtype)
        try:
            backbone = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
            head = Head(64, out_dim, hidden_dim=64, bottleneck_dim=32, n_layers=2)
            return MultiCropWrapper(backbone, head)
        finally:
            torch.set_default_dtype(default_dtype)


def run_setting(
    setting: CollapseSetting,
    steps: int = 400,
    out_dim: int = 256,
    batch_size: int = 64,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    center_momentum: float = 0.9,
    teacher_momentum: float = 0.99,
    lr: float = 3e-3,
    noise: float = 1.5,
    drop: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> CollapseRun:
    """Train a tiny student/teacher pair with one arm of the study and record its curves.

    The model is a 2-layer MLP backbone (32 -> 64) with the package's :class:`~dino_nb.model.Head`
    and :class:`~dino_nb.loss.Loss`, the teacher an EMA of the student; the data are
    random Gaussian clusters and the "augmentations" noise plus feature dropout.

    Args:
        setting: which of centering, sharpening and the momentum teacher are on.
        steps: optimizer steps.
        out_dim: K, the number of prototypes.
        batch_size: samples per step.
        teacher_temp: teacher temperature when sharpening is on (0.04 in the paper).
        student_temp: student temperature; also the teacher's when sharpening is off.
        center_momentum: EMA rate of the center when centering is on.
        teacher_momentum: EMA rate of the teacher's weights (0 when the arm has no momentum).
        lr: AdamW learning rate.
        noise: standard deviation of the noise added to make a view.
        drop: probability that a feature is zeroed in a view.
        seed: seeds the data, the model and the views.
        dtype: of the data, views, model and center: ``torch.float64`` (default) or
            ``torch.float32``. The arm without a momentum teacher oscillates; in float32 its
            tails depend on the CPU's kernels (``randn`` differs in the 7th digit between
            AVX-512 and plain ones), in float64 they agree to the printed precision.

    Returns:
        the per-step curves, and the trained teacher's targets for the whole toy data set.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    data, clusters = _toy_data(2048, 32, N_CLUSTERS, generator, dtype)  # (2048, 32), (2048,)
    student = _toy_student(out_dim, seed, dtype)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss_fn = Loss(
        out_dim,
        teacher_temp=teacher_temp if setting.sharpening else student_temp,
        student_temp=student_temp,
        center_momentum=center_momentum if setting.centering else 1.0,  # 1.0 keeps the center at 0
    ).to(dtype)  # the center buffer
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    run = CollapseRun(setting, max_entropy=math.log(out_dim))
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        views = _two_views(data[idx], generator, noise, drop)  # 2 x (batch, 32)
        with torch.no_grad():
            teacher_out = teacher(views)  # 2 x (batch, K)
        student_out = student(views)  # 2 x (batch, K)
        _record(run, loss_fn, teacher_out, student_out)  # before the loss moves the center
        loss = loss_fn(student_out, teacher_out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(teacher, student, teacher_momentum if setting.momentum else 0.0)
        run.loss.append(float(loss.detach()))
    with torch.no_grad():  # the trained teacher's targets for every sample, without views
        run.targets = loss_fn.teacher_probs(teacher([data]))[0]  # (2048, K)
    run.clusters = clusters
    return run


def _record(
    run: CollapseRun,
    loss_fn: Loss,
    teacher_out: list[torch.Tensor],
    student_out: list[torch.Tensor],
) -> None:
    """Append this step's teacher entropy, batch-mean entropy and KL: the targets of this step."""
    p_t = loss_fn.teacher_probs(teacher_out)  # 2 x (batch, K)
    with torch.no_grad():
        log_p_s = [F.log_softmax(s / loss_fn.student_temp, dim=-1) for s in student_out]
    run.entropy.append(float(mean_entropy(p_t)))
    run.batch_entropy.append(float(batch_mean_entropy(p_t)))
    run.kl.append(float(teacher_student_kl(p_t, log_p_s)))


def collapse_study(
    settings: Sequence[CollapseSetting] = SETTINGS, steps: int = 400, seed: int = 0, **kwargs: float
) -> list[CollapseRun]:
    """Run every arm with the same data, model initialisation and seed (a few seconds on a CPU).

    Args:
        settings: the arms; default the paper's three and the one without a momentum teacher.
        steps: optimizer steps per arm.
        seed: shared seed, so the arms differ only in their settings.
        **kwargs: passed on to :func:`run_setting` (``out_dim``, ``teacher_temp``, ...).
    """
    return [run_setting(s, steps=steps, seed=seed, **kwargs) for s in settings]


def collapse_figure(runs: Sequence[CollapseRun]) -> Figure:
    """Three panels per step, one line per arm: teacher entropy, batch entropy, teacher-student KL.

    The entropy panels mark log K (uniform) and 0 (one-hot).

    Returns:
        a figure with three axes.
    """
    if not runs:
        raise ValueError("no runs to plot")
    fig = new_figure((13, 3.8))
    ax_h, ax_b, ax_kl = fig.subplots(1, 3)
    for run in runs:
        ax_h.plot(run.entropy, label=run.setting.name)
        ax_b.plot(run.batch_entropy, label=run.setting.name)
        ax_kl.plot(run.kl, label=run.setting.name)
    for ax in (ax_h, ax_b):
        ax.axhline(runs[0].max_entropy, color="gray", linestyle="--", linewidth=1)
        ax.text(0, runs[0].max_entropy, " log K (uniform)", va="top", fontsize=8, color="gray")
        ax.axhline(0, color="gray", linestyle=":", linewidth=1)
    ax_h.set_title("teacher entropy, per sample $h(P_t)$")
    ax_b.set_title("entropy of the batch-mean teacher output")
    ax_kl.set_title("KL$(P_t \\| P_s)$")
    ax_kl.set_yscale("log")
    for ax in (ax_h, ax_b, ax_kl):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- K, the number of prototypes


@dataclass(frozen=True)
class PrototypeUse:
    """How a trained teacher spreads the toy data over its K prototypes.

    Attributes:
        out_dim: K.
        used: prototypes that are the top choice (argmax of the target) of at least one sample.
        purity: fraction of the samples whose top prototype's most common cluster is their own:
            1 when no prototype mixes clusters; at most ``K / 8`` when K is below the 8 clusters.
        entropy: mean entropy of one sample's target, in nats.
        batch_entropy: entropy of the targets averaged over all samples, in nats.
    """

    out_dim: int
    used: int
    purity: float
    entropy: float
    batch_entropy: float


def prototype_use(run: CollapseRun) -> PrototypeUse:
    """Measure how ``run``'s trained teacher partitions the toy data (see :class:`PrototypeUse`)."""
    if run.targets is None or run.clusters is None:
        raise ValueError("the run holds no targets")
    top = run.targets.argmax(dim=-1)  # (n_samples,)
    majority = 0
    for k in top.unique():
        majority += int(torch.bincount(run.clusters[top == k]).max())
    return PrototypeUse(
        out_dim=run.targets.shape[-1],
        used=int(top.unique().numel()),
        purity=majority / len(top),
        entropy=float(mean_entropy([run.targets])),
        batch_entropy=float(batch_mean_entropy([run.targets])),
    )


def prototype_study(
    out_dims: Sequence[int] = (2, 4, 8, 64, 1024), steps: int = 400, seed: int = 0, **kwargs: float
) -> list[PrototypeUse]:
    """Train the full recipe (centering, sharpening, EMA teacher) once per K and measure each teacher.

    The toy data has 8 clusters. With K below 8 the teacher must give several clusters the
    same prototype; with K well above, each cluster gets prototypes of its own.

    Args:
        out_dims: the values of K.
        steps: optimizer steps per run.
        seed: shared seed: the runs differ only in K.
        **kwargs: passed on to :func:`run_setting`.
    """
    runs = (run_setting(SETTINGS[0], steps, k, seed=seed, **kwargs) for k in out_dims)
    return [prototype_use(run) for run in runs]
