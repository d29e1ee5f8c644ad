"""Optimizer-side helpers: per-tensor gradient clipping, parameter groups, EMA update."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
