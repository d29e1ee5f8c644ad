"""Per-iteration schedules of the official DINO recipe.

Learning rate, weight decay and teacher momentum follow :func:`cosine_schedule`; the
teacher temperature follows :func:`linear_warmup_schedule`.
"""

from __future__ import annotations

import numpy as np


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
        raise ValueError(f"epochs and niter_per_ep must be positive, got {epochs} and {niter_per_ep}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    total = epochs * niter_per_ep
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n = total - warmup_iters
    iters = np.arange(n)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(n, 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total, (len(schedule), total)
    return schedule


def linear_warmup_schedule(
    warmup_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: float
) -> np.ndarray:
    """Linear ramp from ``warmup_value`` to ``final_value`` over ``warmup_epochs``, then constant.

    DINO warms the teacher temperature up from 0.04 to 0.07 over 30 epochs: a teacher
    that is too sharp early makes training unstable.

    Returns:
        float64 array of length ``epochs * niter_per_ep``.
    """
    if epochs <= 0 or niter_per_ep <= 0:
        raise ValueError(f"epochs and niter_per_ep must be positive, got {epochs} and {niter_per_ep}")
    total = epochs * niter_per_ep
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    if warmup_iters < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    # a warmup longer than the run is cut off where the run ends, not squeezed into it
    ramp = np.linspace(warmup_value, final_value, warmup_iters)[:total]
    return np.concatenate((ramp, np.full(total - len(ramp), float(final_value))))
