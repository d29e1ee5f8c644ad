"""The DINO loss: cross-entropy from a centred, sharpened teacher to the student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: How the teacher's output is kept from collapsing onto one prototype.
CENTERINGS = ("center", "sinkhorn")


class DINOLoss(nn.Module):
    r"""Self-distillation loss with centering and sharpening (DINO, Eq. 1-4).

    For teacher view :math:`t` and student view :math:`s \ne t`,

    .. math::
        H(P_t, P_s) = -\sum_k P_t^{(k)} \log P_s^{(k)}, \quad
        P_t = \operatorname{softmax}((g_t - c) / \tau_t), \quad
        P_s = \operatorname{softmax}(g_s / \tau_s),

    averaged over the batch and over all (teacher view, student view) pairs except the
    same view. The teacher's output is centred by ``c``, an exponential moving average of
    the teacher's mean logits (it stops one dimension from dominating), and sharpened by a
    low temperature (it stops the output from going uniform); the paper shows that either
    alone collapses.

    Args:
        out_dim: number of logits (the head's ``out_dim``).
        teacher_temp: teacher temperature :math:`\tau_t`; a schedule may assign
            ``loss.teacher_temp`` between steps.
        student_temp: student temperature :math:`\tau_s`.
        center_momentum: EMA rate ``m`` of the center, ``c <- m c + (1 - m) mean(g_t)``.
            ``1.0`` keeps the center at zero, which turns centering off.
        centering: ``"center"`` (the paper's EMA center above) or ``"sinkhorn"``: the
            teacher's targets are balanced over the batch by Sinkhorn-Knopp instead (DINOv2,
            after SwAV), see :func:`sinkhorn_knopp`; the center is then not used.
        sinkhorn_iters: Sinkhorn-Knopp iterations (DINOv2: 3).

    Attributes:
        center: buffer of shape ``(1, out_dim)``; a buffer so that it moves with ``.to()``
            and is saved in ``state_dict`` but is not trained by the optimizer.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iters: int = 3,
    ) -> None:
        super().__init__()
        if teacher_temp <= 0 or student_temp <= 0:
            raise ValueError(
                f"temperatures must be positive, got teacher {teacher_temp}, student {student_temp}"
            )
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        self.centering, self.sinkhorn_iters = centering, sinkhorn_iters
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_output: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Centred (or balanced), sharpened teacher targets per view, each ``(n_samples, out_dim)``, no grad."""
        if self.centering == "sinkhorn":  # all views together: one balanced assignment
            logits = torch.cat([_at_least_fp32(t.detach()) for t in teacher_output])  # (V * n, K)
            probs = sinkhorn_knopp(logits / self.teacher_temp, self.sinkhorn_iters)
            return list(probs.chunk(len(teacher_output)))
        return [
            F.softmax((_at_least_fp32(t.detach()) - self.center) / self.teacher_temp, dim=-1)
            for t in teacher_output
        ]

    def forward(
        self,
        student_output: Sequence[torch.Tensor],
        teacher_output: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Evaluate the loss and update the center.

        Args:
            student_output: ``n_crops`` logits of the student, each ``(n_samples, out_dim)``;
                the first ones are the global crops, in the teacher's order.
            teacher_output: logits of the teacher on the global crops, each
                ``(n_samples, out_dim)``.
            targets: :meth:`teacher_probs` of ``teacher_output``, when the caller already
                computed them; they must be taken before this call moves the center.

        Returns:
            scalar loss (float32 for half-precision or float32 logits, float64 for float64).
        """
        if len(student_output) < 2 or len(teacher_output) < 1:
            raise ValueError(
                f"need >= 2 student crops and >= 1 teacher crop, got {len(student_output)} and {len(teacher_output)}"
            )
        teacher_p = self.teacher_probs(teacher_output) if targets is None else targets
        if len(teacher_p) != len(teacher_output):
            raise ValueError(
                f"{len(teacher_p)} targets for {len(teacher_output)} teacher views; "
                "pass teacher_probs(teacher_output)"
            )
        loss = self.cross_entropy(student_output, teacher_p)
        self.update_center(teacher_output)
        return loss

    def cross_entropy(
        self, student_output: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Mean of :math:`H(P_t, P_s)` over every teacher view ``t`` and student view ``s != t``.

        Args:
            student_output: ``n_crops`` logits of the student, each ``(n_samples, out_dim)``,
                the global crops first, in the teacher's order.
            targets: the teacher's :meth:`teacher_probs`, each ``(n_samples, out_dim)``.

        Returns:
            scalar loss; the center does not move (:meth:`update_center` moves it).
        """
        student_logp = [
            F.log_softmax(_at_least_fp32(s) / self.student_temp, dim=-1) for s in student_output
        ]
        total = student_logp[0].new_zeros(())
        n_terms = 0
        for t_ix, t in enumerate(targets):
            for s_ix, s in enumerate(student_logp):
                if t_ix == s_ix:
                    continue  # same view: nothing to predict
                total = total + torch.sum(-t * s, dim=-1).mean()
                n_terms += 1
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output: Sequence[torch.Tensor]) -> None:
        """EMA update of the center from the teacher's mean logits over all views and ranks.

        Under Sinkhorn-Knopp centering the center is not used and stays where it is.
        """
        if self.centering != "center":
            return
        logits = torch.cat(
            [_at_least_fp32(t) for t in teacher_output]
        )  # (n_views * n_samples, out_dim)
        batch_center = logits.sum(dim=0, keepdim=True)  # (1, out_dim)
        count = logits.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in half precision (softmax and exp overflow there), else as it is.

    float64 stays float64: notebook 03's collapse toy runs in float64 so that its printed
    numbers do not depend on the CPU's kernels.
    """
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iters: int = 3) -> torch.Tensor:
    r"""Soft assignments of samples to prototypes with equal prototype mass (Sinkhorn-Knopp).

    Starting from :math:`Q = \exp(\text{scores})^\top` (``K x B``), alternately rescales the
    rows so that every prototype gets the same total mass and the columns so that every sample
    gets the same (Cuturi 2013; SwAV and DINOv2 use it for their targets). A prototype that
    every sample favours is divided out in every batch (what the EMA center learns over many
    steps), and no prototype can take the whole batch. The row sums run over all ranks when
    ``torch.distributed`` is initialised, so the batch is the global batch.

    Args:
        scores: ``(B, K)`` logits already divided by the temperature.
        iters: rescaling rounds (each one rows then columns).

    Returns:
        ``(B, K)`` targets: each row is a distribution over the ``K`` prototypes.
    """
    distributed = dist.is_available() and dist.is_initialized()
    peak = scores.max()
    if distributed:  # the same shift on every rank (any shift cancels; this avoids overflow)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp(_at_least_fp32(scores) - peak).t()  # (K, B)
    # Every constant factor (the 1/K and 1/B targets, a global normalisation) cancels in the
    # next rescaling, so each round only divides by the current sums.
    for _ in range(iters):
        rows = q.sum(dim=1, keepdim=True)  # (K, 1): each prototype's mass
        if distributed:
            dist.all_reduce(rows)
        q /= rows.clamp_min(1e-30)
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)  # columns (local): each sample's mass
    return q.t()  # (B, K): rows sum to 1


#: The tutorial's name for :class:`DINOLoss`.
Loss = DINOLoss


# --------------------------------------------------------------------------- koleo


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean negative log distance from each embedding to its nearest other one, after L2 norm.

    Args:
        embeddings: ``(n_samples, dim)`` backbone embeddings of one view, ``n_samples >= 2``.
        eps: keeps the logarithm finite when two embeddings coincide.

    Returns:
        a float32 scalar; the gradient moves every embedding away from its nearest neighbour.
        Float32 under autocast too: half precision cannot tell apart the cosines of a
        crowded batch (they differ by less than fp16's 2^-11 near 1).

    Raises:
        ValueError: for fewer than 2 samples (no neighbour) or a tensor that is not 2-D.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(
            f"koleo_loss needs (n_samples >= 2, dim) embeddings, got {tuple(embeddings.shape)}"
        )
    # autocast would run the matmul in half precision and pick a wrong neighbour for most
    # rows of a crowded batch (97% of them in tests/test_loss.py's setting, 20 seeds)
    with torch.autocast(embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.float(), dim=-1, eps=eps)  # (n, dim) on the unit sphere
        with torch.no_grad():  # which neighbour is nearest is a choice, not a function to learn
            similarity = x @ x.t()  # (n, n); the largest cosine is the smallest distance
            similarity.fill_diagonal_(-2.0)  # never one's own neighbour
            nearest = similarity.argmax(dim=1)  # (n,)
        distances = (x - x[nearest]).norm(dim=-1)  # (n,)
        return -torch.log(distances + eps).mean()


# --------------------------------------------------------------------------- signals


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
