"""One DINO step, and the run state it acts on.

:func:`train_step` is the paper's Algorithm 1 for one batch, read top to bottom: the teacher
sees the two global crops, the student all crops, the loss compares every teacher view with
every other student view; then backward, per-tensor clipping, the last-layer freeze, the
optimizer step, the EMA update of the teacher and the center's update. What a run adds to
the paper (:class:`Extras`: DINOv2's KoLeo term, fp16 loss scaling) are pieces the step is
given; without them the step is the paper's. :func:`build_run` makes everything it needs
from a :class:`~dino_nb.config.TrainConfig`; :func:`dino_nb.loop.train` calls it once per
batch, and ``benchmarks/bench_step.py`` and notebook 04 call the same function.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .distributed import DistInfo, allow_tf32, resolve_precision, single_process
from .loss import DINOLoss, collapse_signals, koleo_loss
from .model import MultiCropWrapper, student_teacher_from_config


@dataclass
class StepOutput:
    """What one step returns, still on the device (reading it forces a sync).

    Attributes:
        loss: the DINO loss of the batch, a 0-dim tensor.
        signals: collapse signals (``teacher_entropy``, ``batch_entropy``, ``kl``, and
            ``koleo`` when the run uses it) as 0-dim tensors, when the step was asked for them.
    """

    loss: torch.Tensor
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Run:
    """What a DINO run trains: student, teacher, loss, optimizer and the schedules.

    Attributes:
        cfg: the configuration it was built from.
        info: rank, world size and device of this process.
        student: what forward and backward run through (DDP-wrapped on several processes).
        student_module: the plain student, for clipping, EMA and checkpoints.
        teacher: the EMA teacher; never in the optimizer.
        loss: the DINO loss, with its center buffer.
        optimizer: AdamW over the student (two groups: decayed and not).
        extras: what the run adds to the paper's step (KoLeo, the fp16 loss scaler).
        amp_dtype: autocast dtype, ``None`` for fp32.
        steps_per_epoch: optimizer steps in one pass over the training set.
        schedules: values per iteration; replaced when a time budget fixes the length.
    """

    cfg: TrainConfig
    info: DistInfo
    student: nn.Module
    student_module: MultiCropWrapper
    teacher: MultiCropWrapper
    loss: DINOLoss
    optimizer: torch.optim.Optimizer
    extras: Extras
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    schedules: Schedules

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The fp16 loss scaler of :attr:`extras` (disabled in every other precision)."""
        return self.extras.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.extras.scaler = scaler

    @property
    def device(self) -> torch.device:
        """The device of this process."""
        return self.info.device

    @property
    def global_batch(self) -> int:
        """Images per step over all processes."""
        return self.cfg.batch_size * self.info.world_size

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass, or nothing in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def checkpoint(self, step: int, **extra: Any) -> dict[str, Any]:
        """The state to save: weights, optimizer, loss center, step, config (``weights_only``-safe)."""
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss.state_dict(),
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "config": self.cfg.to_dict(),
            **extra,
        }

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint` for the weights, the optimizer and the loss."""
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # {} when it was saved in bf16, fp32 or on the CPU (scaler off)
            self.scaler.load_state_dict(state["scaler"])  # a fresh fp16 scaler otherwise
        self.loss.load_state_dict(state["loss"])


def train_step(
    run: Run, crops: Sequence[torch.Tensor], values: StepValues, signals: bool = False
) -> StepOutput:
    """One DINO iteration on one batch, the paper's Algorithm 1; nothing here waits for the device.

    Without extras (``Extras()``: fp32, no KoLeo) this is the paper's step, line by line;
    :class:`Extras` says what its pieces add.

    Args:
        run: the run state (models, loss, optimizer, extras).
        crops: ``[global 1, global 2, local 1, ...]``, each ``(B, 3, s, s)`` normalised, on the device.
        values: this iteration's lr, weight decay, teacher momentum and temperature, freeze flag.
        signals: also return the collapse signals (entropies and KL) of this batch.

    Returns:
        the DINO loss alone (also when the step descends it plus KoLeo), and the signals.
    """
    # -- this iteration's values: lr, weight decay (none on biases and norms), temperature
    for i, group in enumerate(run.optimizer.param_groups):  # group 0 is decayed, group 1 is not
        group["lr"] = values.lr
        group["weight_decay"] = values.weight_decay if i == 0 else 0.0
    run.loss.teacher_temp = values.teacher_temp

    # -- the teacher sees the 2 global views, the student every view
    with run.autocast():
        teacher_out = run.teacher(crops[:2])  # 2 x (B, K)
        student_out, features = run.student(crops, return_embeddings=True)  # n_crops x (B, K)
        targets = run.loss.teacher_probs(teacher_out)  # centred, sharpened: 2 x (B, K), no grad
        loss = run.loss.cross_entropy(student_out, targets)  # mean H(P_t, P_s) over views s != t
        objective, extra = run.extras.objective(loss, features)  # the loss itself, without extras

    # -- the student learns: backward, clip each gradient, keep the last layer frozen, AdamW
    run.optimizer.zero_grad(set_to_none=True)
    run.extras.backward(objective, run.optimizer)  # objective.backward(), without extras
    if run.cfg.clip_grad > 0:
        clip_gradients(run.student_module, run.cfg.clip_grad)
    if values.freeze_last_layer:
        cancel_gradients(run.student_module.new_head.last_layer.parameters())
    run.extras.step(run.optimizer)  # run.optimizer.step(), without extras

    # -- the teacher follows the student (EMA), then the center follows the teacher
    ema_update(run.teacher, run.student_module, values.momentum)  # t <- m t + (1 - m) s
    run.loss.update_center(teacher_out)  # c <- m c + (1 - m) mean of this batch's teacher logits
    found = {**collapse_signals(targets, loss), **extra} if signals else {}
    return StepOutput(loss.detach(), found)


@dataclass
class Extras:
    """What a run adds to the paper's step, at two places: what it descends, and how.

    ``Extras()`` adds nothing. Sinkhorn-Knopp centering, the other addition from DINOv2, lives
    in the loss (:class:`~dino_nb.loss.DINOLoss`), the collapse signals in ``train_step``'s
    ``signals``.

    Attributes:
        koleo_weight: weight of the KoLeo term (DINOv2, Oquab et al. 2023, after Sablayrolles
            et al. 2019) on the student's two global views; 0 leaves it out.
        scaler: PyTorch's automatic mixed precision loss scaler, on in fp16 (whose small
            gradients underflow to zero unscaled); disabled, in every other precision, it
            passes the loss, the gradients and the optimizer step through unchanged.
    """

    koleo_weight: float = 0.0
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )

    def objective(
        self, loss: torch.Tensor, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the step descends (the DINO loss, plus the weighted KoLeo), and extra signals.

        Args:
            loss: the DINO loss of the batch.
            features: the student's backbone embeddings, ``n_crops`` tensors ``(B, D)``.
        """
        if not self.koleo_weight:
            return loss, {}
        koleo = sum(koleo_loss(f) for f in features[:2])  # spread each global view over the batch
        return loss + self.koleo_weight * koleo, {"koleo": koleo.detach()}

    def backward(self, objective: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``objective.backward()``; in fp16 of the scaled objective, then unscaled for clipping."""
        self.scaler.scale(objective).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; in fp16 skipped after an overflow, and the scale adapts."""
        self.scaler.step(optimizer)
        self.scaler.update()


# ----------------------------------------------------------------------------- building a run


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(cfg: TrainConfig, info: DistInfo | None = None, steps_per_epoch: int = 1) -> Run:
    """Build student, teacher, loss, optimizer and schedules from ``cfg`` (seeded by ``cfg.seed``).

    Args:
        cfg: the configuration.
        info: the process (rank, world size, device); default one process on ``cfg.device``.
        steps_per_epoch: steps in one epoch of the data (``TrainingData.steps_per_epoch``);
            the schedules span ``cfg.epochs`` of them until a time budget replaces them.
    """
    info = info or single_process(cfg)
    amp_dtype = resolve_precision(cfg.precision, info.device)
    allow_tf32(info.device)
    seed_everything(cfg.seed)  # the same on every rank: the teachers must start equal too
    student, teacher = student_teacher_from_config(cfg)
    if cfg.use_bn_in_head and info.enabled and info.device.type == "cuda":
        # batch statistics over the global batch, as the official code does (CUDA only)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(info.device), teacher.to(info.device)
    teacher.eval()  # no drop-path in the teacher ...
    teacher.new_head.train()  # ... but a BatchNorm in its head normalises by the batch, as the student's
    if info.enabled:  # from here on each rank draws its own drop-path masks
        seed_everything(cfg.seed + info.rank)
    if cfg.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    wrapped: nn.Module = student
    if info.enabled:
        wrapped = DistributedDataParallel(
            student, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    global_batch = cfg.batch_size * info.world_size
    return Run(
        cfg=cfg,
        info=info,
        student=wrapped,
        student_module=student,
        teacher=teacher,
        loss=DINOLoss(
            cfg.out_dim,
            cfg.warmup_teacher_temp,
            cfg.student_temp,
            cfg.center_momentum,
            centering=cfg.teacher_centering,
        ).to(info.device),
        # lr and wd are set every step; on CUDA the fused kernel, which also lets an fp16
        # scaler skip a step without reading its inf check back to the host every step
        optimizer=torch.optim.AdamW(param_groups(student), fused=info.device.type == "cuda"),
        extras=Extras(
            cfg.koleo_weight,
            torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16),
        ),
        amp_dtype=amp_dtype,
        steps_per_epoch=steps_per_epoch,
        schedules=Schedules(cfg, cfg.epochs * steps_per_epoch, global_batch),
    )


# --------------------------------------------------------------------------- optim


def clip_gradients(model: nn.Module, clip: float = 2.0) -> torch.Tensor:
    """Clip each parameter tensor's gradient to norm ``clip``, separately (as DINO's code does).

    Unlike ``torch.nn.utils.clip_grad_norm_``, which scales all gradients by one factor
    computed from their joint norm, every tensor whose gradient norm exceeds ``clip`` is
    rescaled on its own to norm ``clip`` (up to an epsilon of 1e-6); smaller ones are left
    alone. The work stays on the device: no ``.item()`` per tensor, no host sync.

    Args:
        model: module whose ``.grad`` fields are clipped in place.
        clip: maximum L2 norm per tensor; must be positive.

    Returns:
        the gradient norms before clipping, one per parameter that has a gradient, ``(n,)``.
    """
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2).float() for g in grads])  # (n,)
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    for g, c in zip(grads, coefs, strict=True):
        g.detach().mul_(c.to(g.dtype))
    return norms


def param_groups(model: nn.Module) -> list[dict]:
    """Split trainable parameters: weight decay on weights, none on biases and norm parameters.

    One-dimensional parameters (biases, LayerNorm scales and shifts) are not decayed, as in
    the official code. Neither is the ``g`` of the weight-normalised last layer: a departure,
    since the official ``get_params_groups`` decays it (its ``weight_g`` is ``(K, 1)``, 2-D).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay if p.ndim <= 1 or name.endswith(".bias") or "original0" in name else decay
        ).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def cancel_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Drop the gradients of ``params`` (the last layer during the first epoch)."""
    for p in params:
        p.grad = None


# --------------------------------------------------------------------------- schedules


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Linear warmup, then a half cosine from ``base_value`` to ``final_value``.

    Same semantics as the official DINO ``cosine_scheduler``: ``warmup_epochs *
    niter_per_ep`` iterations go linearly from ``start_warmup_value`` to ``base_value``
    (both ends included); the rest follow
    ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for ``i = 0 .. n - 1``.

    Args:
        base_value: value at the end of warmup (and at the start without warmup).
        final_value: value the cosine approaches at the last iteration.
        epochs: number of epochs.
        niter_per_ep: iterations per epoch.
        warmup_epochs: epochs of linear warmup (may be 0).
        start_warmup_value: first value of the warmup.

    Returns:
        float64 array of length ``epochs * niter_per_ep``, one value per iteration.
    """
    if epochs <= 0 or niter_per_ep <= 0:
        raise ValueError(
            f"epochs and niter_per_ep must be positive, got {epochs} and {niter_per_ep}"
        )
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    total = epochs * niter_per_ep
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n = total - warmup_iters
    iters = np.arange(n)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(n, 1))
    )
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total, (len(schedule), total)
    return schedule


def linear_warmup_schedule(
    warmup_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: float
) -> np.ndarray:
    """Linear ramp from ``warmup_value`` to ``final_value`` over ``warmup_epochs``, then constant.

    DINO warms the teacher temperature up from 0.04 to 0.07 over 30 epochs. The official
    code's comment gives the reason: a temperature that is too high makes training
    unstable at the beginning, so the teacher starts sharp (0.04) and loosens later.

    Returns:
        float64 array of length ``epochs * niter_per_ep``.
    """
    if epochs <= 0 or niter_per_ep <= 0:
        raise ValueError(
            f"epochs and niter_per_ep must be positive, got {epochs} and {niter_per_ep}"
        )
    total = epochs * niter_per_ep
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    if warmup_iters < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    # a warmup longer than the run is cut off where the run ends, not squeezed into it
    ramp = np.linspace(warmup_value, final_value, warmup_iters)[:total]
    return np.concatenate((ramp, np.full(total - len(ramp), float(final_value))))


@dataclass(frozen=True)
class StepValues:
    """The scheduled values of one iteration.

    Attributes:
        lr: learning rate of every parameter group.
        weight_decay: weight decay of the decayed group (biases and norms get none).
        momentum: teacher EMA momentum after the step.
        teacher_temp: teacher temperature of the loss.
        freeze_last_layer: cancel the last layer's gradients in this step.
    """

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool


class Schedules:
    """Every schedule of a run, one value per iteration, spanning ``total_steps``.

    The recipe is written in epochs (``cfg.epochs``, ``warmup_epochs``, ...). Here it is
    laid over ``total_steps`` iterations: each epoch-valued setting becomes the same
    fraction of the run. With ``total_steps = cfg.epochs * steps_per_epoch`` that is the
    official recipe exactly; a time budget (``--minutes``) picks another ``total_steps``
    and the whole recipe (warmups, cosines, the last-layer freeze) stretches or shrinks
    with it.

    Args:
        cfg: the run's configuration.
        total_steps: iterations the schedules span.
        global_batch: images per iteration over all processes (scales the lr linearly).
    """

    def __init__(self, cfg: TrainConfig, total_steps: int, global_batch: int) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.total_steps = int(total_steps)

        def frac(epochs: float) -> float:  # an epoch count as a fraction of the recipe
            return epochs / cfg.epochs

        n = self.total_steps
        peak_lr = cfg.base_lr * global_batch / 256  # the linear scaling rule (Goyal et al. 2017)
        self.lr = cosine_schedule(peak_lr, cfg.min_lr, 1, n, frac(cfg.warmup_epochs))
        self.weight_decay = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, 1, n)
        self.momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, 1, n)
        self.teacher_temp = linear_warmup_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, 1, n, frac(cfg.warmup_teacher_temp_epochs)
        )
        self.freeze_steps = int(round(frac(cfg.freeze_last_layer) * n))
        self.warmup_steps = int(round(frac(cfg.warmup_epochs) * n))  # of the learning rate

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> StepValues:
        """Values of iteration ``step``; past the end, those of the last iteration."""
        i = min(step, self.total_steps - 1)
        return StepValues(
            lr=float(self.lr[i]),
            weight_decay=float(self.weight_decay[i]),
            momentum=float(self.momentum[i]),
            teacher_temp=float(self.teacher_temp[i]),
            freeze_last_layer=step < self.freeze_steps,
        )
