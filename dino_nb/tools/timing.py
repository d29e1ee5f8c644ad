"""How long a recipe's steps take on this machine, before giving it hours: :func:`time_steps`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from ..config import TrainConfig
from ..loader import build_training_data
from ..step import build_run, train_step


class StepTime(NamedTuple):
    """What :func:`time_steps` measured: seconds per step (loading included) and the epoch's steps."""

    seconds: float
    steps_per_epoch: int

    @property
    def epoch_seconds(self) -> float:
        """Expected wall time of one epoch, evaluations aside."""
        return self.seconds * self.steps_per_epoch


def time_steps(
    cfg: TrainConfig,
    steps: int = 5,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> StepTime:
    """Time a few steps of ``cfg``'s run on this machine, before committing hours to it.

    A throwaway run (nothing is saved) takes ``warmup + steps`` iterations, each timed from
    asking the loader for a batch to the loss on the host, so a loader that cannot keep up
    shows; the first ``warmup`` (workers starting, autotuning) are not counted.

    Args:
        cfg: the run's configuration.
        steps: iterations averaged.
        warmup: iterations run first and not counted.
        clock: seconds from an arbitrary origin (a fake one in the tests).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    data = build_training_data(cfg)
    run = build_run(cfg, steps_per_epoch=data.steps_per_epoch)
    batches = data.batches(0)
    seconds = []
    for step in range(warmup + steps):
        start = clock()
        _, images = next(batches)
        crops = data.crops(images, step, run.device, cfg.seed)
        train_step(run, crops, run.schedules[step % len(run.schedules)]).loss.item()
        seconds.append(clock() - start)
    return StepTime(sum(seconds[warmup:]) / steps, data.steps_per_epoch)
