r"""Collapse signals: is the teacher uniform, or is every sample on one prototype?

DINO has two trivial solutions (Caron et al. 2021, Sec. 5.3; :mod:`dino_nb.collapse` shows
both). Three numbers per step tell them apart, all in nats, from the teacher's centred and
sharpened probabilities :math:`P_t` (:meth:`dino_nb.loss.Loss.teacher_probs`):

* the **mean per-sample entropy** :math:`\overline{h(P_t)}`: :math:`\log K` when the
  teacher is uniform (centering dominates), 0 when each target is one-hot;
* the **entropy of the batch-mean distribution** :math:`h(\overline{P_t})`: near 0 when
  every sample's target is the same prototype (sharpening dominates), high when the batch
  spreads over many; :math:`e^h` is the effective number of prototypes the batch uses;
* the **teacher-student KL** :math:`\mathrm{KL}(P_t \| P_s)` over the loss's (teacher view,
  student view) pairs: near 0 in either collapse, since the student copies a trivial target.

Cross-entropy is entropy plus KL, and each teacher view meets the same number of student
views, so the DINO loss is exactly :math:`\overline{h(P_t)} + \overline{\mathrm{KL}}`:
:func:`collapse_signals` gets the KL from the loss for free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``probs`` ``(n_samples, K)``; returns ``(n_samples,)``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


def kl_divergence(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row, from probabilities ``p`` and log-probabilities ``log_q``, each ``(n, K)``."""
    return (p * (p.clamp_min(1e-12).log() - log_q)).sum(dim=-1)


@torch.no_grad()
def mean_entropy(teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean per-sample entropy of the teacher's output over all views: a 0-dim tensor.

    Args:
        teacher_probs: one ``(n_samples, K)`` tensor per teacher view.
    """
    return entropy(torch.cat(list(teacher_probs))).mean()  # cat: (n_views * n_samples, K)


@torch.no_grad()
def batch_mean_entropy(teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entropy of the teacher's output averaged over samples and views: a 0-dim tensor.

    On one rank's batch: with ``n`` samples it cannot exceed ``log(min(n * n_views, K))``.

    Args:
        teacher_probs: one ``(n_samples, K)`` tensor per teacher view.
    """
    return entropy(torch.cat(list(teacher_probs)).mean(dim=0))  # mean: (K,)


@torch.no_grad()
def teacher_student_kl(
    teacher_probs: Sequence[torch.Tensor], student_log_probs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean ``KL(P_t || P_s)`` over the loss's pairs: every teacher view ``t``, student view ``s != t``.

    Args:
        teacher_probs: one ``(n_samples, K)`` tensor per teacher (global) view.
        student_log_probs: one ``(n_samples, K)`` tensor per student view, global views first,
            e.g. ``F.log_softmax(s.float() / loss.student_temp, dim=-1)``.

    Returns:
        a 0-dim tensor.
    """
    kls = [
        kl_divergence(p_t, log_p_s).mean()
        for t, p_t in enumerate(teacher_probs)
        for s, log_p_s in enumerate(student_log_probs)
        if s != t
    ]
    if not kls:
        raise ValueError(
            f"no (teacher, student) pairs: {len(teacher_probs)} teacher and {len(student_log_probs)} student views"
        )
    return torch.stack(kls).mean()


@torch.no_grad()
def collapse_signals(
    teacher_probs: Sequence[torch.Tensor], loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The three signals of one step, as 0-dim tensors (no device sync), the KL from the loss.

    Args:
        teacher_probs: ``loss_fn.teacher_probs(teacher_output)``, taken *before* the loss's
            forward updates the center, so that they are the targets the loss used.
        loss: that step's DINO loss (a 0-dim tensor).

    Returns:
        ``{"teacher_entropy", "batch_entropy", "kl"}``; ``kl = loss - teacher_entropy``.
    """
    h = mean_entropy(teacher_probs)
    return {
        "teacher_entropy": h,
        "batch_entropy": batch_mean_entropy(teacher_probs),
        "kl": loss.detach() - h,
    }


class CollapseMonitor:
    """Watches logged values and warns, once, when training looks collapsed, saying what to try.

    Both checks wait until ``warmup_steps`` (at initialisation the loss is near ``log K`` and
    a random ViT maps every image to nearly the same feature, so both look collapsed) and
    need ``patience`` logged values in a row, so that one noisy value does not fire.

    Args:
        out_dim: K, the number of prototypes.
        warmup_steps: steps before which nothing is judged (e.g. the lr warmup's length).
        patience: consecutive logged values that must all look collapsed.
        uniform_fraction: the loss counts as "stuck at log K" above this fraction of it. A
            healthy loss leaves ``log K`` during the warmup; uniform outputs keep it there.
        min_batch_entropy: nats; below it the batch-mean entropy counts as collapsed: 0.5
            means fewer than ``e^0.5 = 1.65`` prototypes in use by the whole batch.
    """

    def __init__(
        self,
        out_dim: int,
        warmup_steps: int = 0,
        patience: int = 10,
        uniform_fraction: float = 0.9,
        min_batch_entropy: float = 0.5,
    ) -> None:
        if out_dim < 2 or patience < 1 or not 0 < uniform_fraction < 1 or min_batch_entropy < 0:
            raise ValueError(
                f"need out_dim >= 2, patience >= 1, 0 < uniform_fraction < 1, min_batch_entropy >= 0; got "
                f"{out_dim}, {patience}, {uniform_fraction}, {min_batch_entropy}"
            )
        self.log_k, self.warmup_steps, self.patience = math.log(out_dim), warmup_steps, patience
        self.uniform_fraction, self.min_batch_entropy = uniform_fraction, min_batch_entropy
        self.fired = False
        self._uniform_run = self._one_hot_run = 0  # consecutive collapsed-looking values

    def update(self, step: int, loss: float, batch_entropy: float | None = None) -> str | None:
        """Feed one logged step; returns a warning the first time a collapse is detected, else None."""
        if step < self.warmup_steps or self.fired:
            return None
        self._uniform_run = (
            self._uniform_run + 1 if loss > self.uniform_fraction * self.log_k else 0
        )
        low = batch_entropy is not None and batch_entropy < self.min_batch_entropy
        self._one_hot_run = self._one_hot_run + 1 if low else 0
        if self._uniform_run >= self.patience:
            self.fired = True
            return (
                f"step {step}: the loss has stayed above {self.uniform_fraction:.0%} of log K = "
                f"{self.log_k:.2f} for {self.patience} logged values: the teacher's outputs are uniform "
                "(centering dominates). Try a lower --teacher-temp / --warmup-teacher-temp, and check "
                "that the learning rate is not ~0 (--base-lr, the warmup)."
            )
        if self._one_hot_run >= self.patience:
            self.fired = True
            return (
                f"step {step}: the batch-mean teacher entropy has stayed below {self.min_batch_entropy} nats "
                f"for {self.patience} logged values: every sample is on the same prototype (sharpening "
                "dominates). Try a longer --warmup-teacher-temp-epochs or a higher --warmup-teacher-temp, a "
                "lower --center-momentum (a faster center), or a lower --base-lr."
            )
        return None
