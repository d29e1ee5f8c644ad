"""Per-iteration schedules of the official DINO recipe.

Learning rate, weight decay and teacher momentum follow :func:`cosine_schedule`; the
teacher temperature follows :func:`linear_warmup_schedule`. :class:`Schedules` bundles
all of them for one run and hands :func:`dino_nb.engine.train_step` the values of one
iteration as a :class:`StepValues`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .config import TrainConfig


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
