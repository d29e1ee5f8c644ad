"""A training sampler whose order and augmentations depend only on (seed, epoch, index).

That makes three things exact: resuming in the middle of an epoch (skip the steps
already done), running on several processes (each rank takes its share of every global
batch), and comparing one process with several (the same images get the same crops).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import DataAugmentation, normalize_uint8
from .config import TrainConfig
from .datasets import DatasetBundle, build_datasets
from .distributed import DistInfo, single_process


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


#: Makes a batch's crops on the device: ``(canvases (B, 3, C, C) uint8, generator) -> crops``.
DeviceCrops = Callable[[torch.Tensor, torch.Generator], list[torch.Tensor]]
#: What a crop pipeline gives the loader: the train set, its collate function, device crops.
PipelineParts = tuple[Dataset, Callable[..., Any] | None, DeviceCrops | None]

#: The fast crop pipelines by name, besides the readable ``pil`` one: ``cache`` (photos decoded
#: once into a pixel cache, crops cut in batches by the loader workers) and ``gpu`` (crops cut on
#: the device). :mod:`dino_nb.fast` registers them when ``dino_nb`` is imported; the core only
#: names them, so that it never imports the speed machinery.
CROP_PIPELINES: dict[
    str, Callable[[TrainConfig, DatasetBundle, DataAugmentation, DistInfo], PipelineParts]
] = {}


def register_crop_pipeline(
    name: str,
    build: Callable[[TrainConfig, DatasetBundle, DataAugmentation, DistInfo], PipelineParts],
) -> None:
    """Make ``build`` the pipeline that :func:`build_training_data` uses for ``name``."""
    CROP_PIPELINES[name] = build


@dataclass
class TrainingData:
    """The data side of a run: datasets, the multi-crop loader and where crops are made.

    Attributes:
        bundle: the datasets (augmented train, plain train and val).
        loader: multi-crop training batches.
        sampler: order and augmentation seeds of every epoch.
        gpu_aug: makes the crops on the device (``--gpu-augment``), else ``None``.
    """

    bundle: DatasetBundle
    loader: DataLoader
    sampler: TrainSampler
    gpu_aug: DeviceCrops | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training set."""
        return self.sampler.steps_per_epoch

    def batches(self, start_step: int) -> Iterator[tuple[int, Any]]:
        """``(epoch, images)`` forever, from iteration ``start_step`` on (exact resume)."""
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, skip)
            for images, _ in self.loader:
                yield epoch, images
            epoch, skip = epoch + 1, 0

    def crops(
        self, images: Any, step: int, device: torch.device, seed: int, rank: int = 0
    ) -> list[torch.Tensor]:
        """A loader batch as normalised crops on ``device``.

        Args:
            images: ``n_crops`` x ``(B, 3, s, s)`` uint8 crops (PIL path), ``(B, 3, C, C)``
                uint8 canvases (``--gpu-augment``), or ``n_crops`` float crops that are
                already normalised (the pixel-cache path).
            step: the iteration; with ``seed`` and ``rank`` it seeds the device-side crops.
            device: where the model runs.
            seed: the run's seed.
            rank: this process's rank.
        """
        if self.gpu_aug is not None:
            generator = torch.Generator(device).manual_seed(sample_seed(seed, step, rank))
            return self.gpu_aug(images.to(device, non_blocking=True), generator)
        crops = [c.to(device, non_blocking=True) for c in images]
        return [normalize_uint8(c) if c.dtype == torch.uint8 else c for c in crops]


#: Images per second that one loader worker turns into multi-crop views (2x224 + 8x96): with
#: torchvision's PIL transforms (``DataAugmentation``), ~75-80 on the developers' 2-core EPYC
#: (``benchmarks/bench_augment.py``); from the pixel cache in batches, ~430.
WORKER_IMAGES_PER_S = {"pil": 80, "cache": 430}


#: What a GPU consumes, an estimate until measured (FLOPs per image for 2x224 + 8x96: the
#: student's forward and backward, the teacher's forward): an A100 on the ``imagenette``
#: preset (ViT-S/16, ~115 GFLOPs per image) at ~40% of its 312 TFLOP/s bf16 peak takes
#: ~1,100 images/s; a T4 on the ``t4`` preset (ViT-Ti/16, ~31 GFLOPs) at ~25% of its 65
#: TFLOP/s fp16 peak ~500. The rule errs towards the device-side crops: they cost the GPU
#: little, while a starved GPU idles.
GPU_IMAGES_PER_S = 1000


def _cores() -> int:
    """CPU cores this process may use (the affinity mask where there is one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_workers(device: torch.device, local_world_size: int | None = None) -> int:
    """Data workers per process: this process's share of the cores, minus one for itself.

    On a GPU machine the cores are shared by the processes ``torchrun`` starts on it
    (``LOCAL_WORLD_SIZE``), each keeping one core for its own loop; at most 8 each. On a CPU
    the cores also run the model, so one worker prepares batches beside it.
    """
    cores = _cores()
    if device.type == "cuda":
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        share = cores // max(1, local_world_size)
        return max(1, min(8, share - 1))
    return 1 if cores >= 2 else 0


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """``cfg.num_workers``, or :func:`default_num_workers` for this device when it is ``None``."""
    return default_num_workers(device) if cfg.num_workers is None else cfg.num_workers


def decide_gpu_augment(cfg: TrainConfig, device: torch.device, workers: int) -> tuple[bool, str]:
    """``cfg.gpu_augment``, with ``"auto"`` decided for this machine, and the reason in words.

    ``auto`` turns the device-side crops on when the loader workers cannot feed the GPU: each
    makes about :data:`WORKER_IMAGES_PER_S` images per second, and a GPU consumes about
    :data:`GPU_IMAGES_PER_S`. A Colab T4 (2 cores, 1 worker), a Kaggle T4 (4 cores, 3
    workers) and the default 8 workers per GPU get it; ``--num-workers 13`` or more (PIL)
    keeps the crops on the CPU. On the CPU the crops are made on the CPU either way, so
    ``auto`` is off there.
    """
    if cfg.gpu_augment != "auto":
        return bool(cfg.gpu_augment), f"--gpu-augment {'on' if cfg.gpu_augment else 'off'} as asked"
    if device.type != "cuda":
        return False, "crops on the CPU (no GPU)"
    per_worker = WORKER_IMAGES_PER_S["cache" if cfg.cache_pixels else "pil"]
    feed = workers * per_worker
    if feed < GPU_IMAGES_PER_S:
        return True, (
            f"crops on the GPU: {workers} loader worker(s) make ~{feed} images/s on the CPU, "
            f"the GPU takes ~{GPU_IMAGES_PER_S}+ (--gpu-augment off to keep them on the CPU)"
        )
    return False, (
        f"crops on the CPU: {workers} loader workers make ~{feed} images/s, enough for the GPU "
        "(--gpu-augment on to move them)"
    )


def build_training_data(cfg: TrainConfig, info: DistInfo | None = None) -> TrainingData:
    """Datasets, the multi-crop loader, its sampler and (``--gpu-augment``) the device-side crops.

    Args:
        cfg: the configuration.
        info: the process (rank, world size, device); default one process on ``cfg.device``.
    """
    info = info or single_process(cfg)
    workers = loader_workers(cfg, info.device)
    on_gpu, _ = decide_gpu_augment(cfg, info.device, workers)
    augmentation = DataAugmentation(
        cfg.global_crops_scale,
        cfg.local_crops_scale,
        cfg.n_local_crops,
        cfg.global_size,
        cfg.local_size,
        normalize=False,  # uint8 crops; normalised on the device after the copy
        blur_sigma=cfg.blur_sigma,
    )
    bundle = build_datasets(cfg.data, augmentation, cfg.global_size, strict=cfg.strict_data)
    pipeline = "gpu" if on_gpu else "cache" if cfg.cache_pixels else "pil"
    if pipeline == "pil":  # the readable path: each worker runs DataAugmentation on PIL images
        train_set, collate, device_crops = SeededDataset(bundle.train_aug), collate_crops, None
    else:
        train_set, collate, device_crops = CROP_PIPELINES[pipeline](cfg, bundle, augmentation, info)
    sampler = TrainSampler(len(train_set), cfg.batch_size, cfg.seed, info.rank, info.world_size)
    loader = make_loader(
        train_set,
        cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        generator=torch.Generator(),
    )
    return TrainingData(bundle, loader, sampler, device_crops)


def collate_crops(
    batch: list[tuple[list[torch.Tensor], int]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stack a batch of multi-crop samples into one tensor per crop.

    Returns:
        ``([crop_0 (B, 3, H0, W0), crop_1, ...], labels (B,))``.
    """
    n_crops = len(batch[0][0])
    crops = [torch.stack([sample[0][i] for sample in batch]) for i in range(n_crops)]
    labels = torch.tensor([sample[1] for sample in batch])
    return crops, labels


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    sampler: Any = None,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` with the options the project uses everywhere.

    Its workers ignore SIGTERM and SIGINT: a stop signal sent to the whole process group
    (``timeout``, a terminal's Ctrl-C, a platform ending a session) is the main process's to
    handle, by finishing its step and saving; a worker killed by it would make the loader
    raise inside that save. The workers end when the main process closes the loader or exits.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn``: leave SIGTERM and SIGINT to the main process (see :func:`make_loader`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
