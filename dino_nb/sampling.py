"""A training sampler whose order and augmentations depend only on (seed, epoch, index).

That makes three things exact: resuming in the middle of an epoch (skip the steps
already done), running on several processes (each rank takes its share of every global
batch), and comparing one process with several (the same images get the same crops).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one image's augmentations in one epoch."""
    return int(
        np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


class TrainSampler(Sampler[tuple[int, int]]):
    """Shuffle each epoch, give each rank its share of every global batch, yield seeds too.

    Yields ``(index, augmentation_seed)`` pairs, to be used with :class:`SeededDataset`.
    Incomplete global batches at the end of an epoch are dropped.

    Args:
        n_samples: dataset length.
        batch_size: per-process batch size.
        seed: base seed of the run.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self, n_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size <= 0 or world_size <= 0:
            raise ValueError(
                f"batch_size and world_size must be positive, got {batch_size} and {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = n_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {n_samples} images, fewer than one global batch of "
                f"{self.global_batch}; lower --batch-size"
            )
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch to draw and the number of its steps already done."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        self.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n_samples, generator=g).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = perm[step * self.global_batch : (step + 1) * self.global_batch]
            for index in chunk[self.rank :: self.world_size]:
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size


class SeededDataset(Dataset):
    """Wrap a dataset so that ``dataset[(index, seed)]`` draws its random augmentations from ``seed``.

    The torch RNG is forked, so the caller's random state is left as it was.
    """

    def __init__(self, dataset: Any, transform: Callable | None = None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sample, target = self.dataset[index]
            if self.transform is not None:
                sample = self.transform(sample)
        return sample, target
