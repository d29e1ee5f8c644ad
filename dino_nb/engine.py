"""One DINO step, and the run state it acts on.

:func:`train_step` is the paper's Algorithm 1 for one batch: the teacher sees the two global
crops, the student sees all crops, the loss compares every teacher view with every other
student view, then backward, per-tensor clipping, the last-layer freeze, the optimizer
step and the EMA update of the teacher. :func:`build_run` makes everything it needs from a
:class:`~dino_nb.config.TrainConfig` and :func:`build_training_data` the batches;
:func:`dino_nb.train.train` loops over them, and
``benchmarks/bench_step.py`` and notebook 04 call the same function.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .augment import DataAugmentation, normalize_uint8
from .config import TrainConfig
from .data import DatasetBundle, build_datasets, collate_crops, make_loader
from .distributed import DistInfo, allow_tf32, pick_device, resolve_precision
from .gpu_augment import DecodeResize, GPUMultiCrop
from .koleo import koleo_loss
from .loss import DINOLoss
from .models import student_teacher_from_config
from .multicrop import MultiCropWrapper
from .optim import cancel_gradients, clip_gradients, ema_update, param_groups
from .pixels import CachedCanvases, MultiCropCollate, WithSeeds
from .sampling import SeededDataset, TrainSampler, sample_seed
from .schedules import Schedules, StepValues
from .signals import collapse_signals


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
        scaler: fp16 loss scaler (a no-op otherwise).
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
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    schedules: Schedules

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


@dataclass
class TrainingData:
    """The data side of a run: datasets, the multi-crop loader and where crops are made.

    Attributes:
        bundle: the datasets (augmented train, plain train and val).
        loader: multi-crop training batches.
        sampler: order and augmentation seeds of every epoch.
        gpu_aug: crops made on the device (``--gpu-augment``), else ``None``.
    """

    bundle: DatasetBundle
    loader: DataLoader
    sampler: TrainSampler
    gpu_aug: GPUMultiCrop | None = None

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


def train_step(
    run: Run, crops: Sequence[torch.Tensor], values: StepValues, signals: bool = False
) -> StepOutput:
    """One DINO iteration on one batch of crops; nothing here waits for the device.

    The returned loss is the DINO loss alone (what the collapse warnings compare with
    ``log K``); with ``cfg.koleo_weight`` the step descends that loss plus the weighted KoLeo
    term of the student's two global views.

    Args:
        run: the run state (models, loss, optimizer, scaler).
        crops: ``[global 1, global 2, local 1, ...]``, each ``(B, 3, s, s)`` normalised, on the device.
        values: this iteration's lr, weight decay, teacher momentum and temperature, freeze flag.
        signals: also return the collapse signals (entropies and KL) of this batch.
    """
    for i, group in enumerate(run.optimizer.param_groups):  # group 0 is decayed, group 1 is not
        group["lr"] = values.lr
        group["weight_decay"] = values.weight_decay if i == 0 else 0.0
    run.loss.teacher_temp = values.teacher_temp
    koleo_weight = run.cfg.koleo_weight
    with run.autocast():
        teacher_out = run.teacher(crops[:2])  # 2 x (B, K): the teacher sees only the global crops
        if koleo_weight:
            student_out, embeddings = run.student(crops, return_embeddings=True)
        else:
            student_out = run.student(crops)  # n_crops x (B, K)
        targets = run.loss.teacher_probs(teacher_out)  # 2 x (B, K), before the center moves
        loss = run.loss(student_out, teacher_out, targets)  # also moves the center
        objective = loss
        if koleo_weight:  # spread each global view's embeddings (B, D) over the batch
            koleo = sum(koleo_loss(e) for e in embeddings[:2])
            objective = loss + koleo_weight * koleo
    found = collapse_signals(targets, loss) if signals else {}
    if signals and koleo_weight:
        found["koleo"] = koleo.detach()
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(objective).backward()
    if run.cfg.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        clip_gradients(run.student_module, run.cfg.clip_grad)
    if values.freeze_last_layer:
        cancel_gradients(run.student_module.new_head.last_layer.parameters())
    run.scaler.step(run.optimizer)
    run.scaler.update()
    ema_update(
        run.teacher, run.student_module, values.momentum
    )  # teacher <- m teacher + (1 - m) student
    return StepOutput(loss.detach(), found)


# ----------------------------------------------------------------------------- building a run


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def single_process(cfg: TrainConfig) -> DistInfo:
    """One process on ``cfg.device``: what a notebook or a benchmark runs as."""
    return DistInfo(0, 1, 0, pick_device(cfg.device))


#: Images per second that one loader worker turns into multi-crop views (2x224 + 8x96): with
#: PIL, ~90-120 on the developers' 2-core Xeon and EPYC (``benchmarks/bench_loader.py``);
#: from the pixel cache in batches, ~430.
WORKER_IMAGES_PER_S = {"pil": 100, "cache": 430}
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
    workers) and the default 8 workers per GPU get it; ``--num-workers 10`` or more (PIL)
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
    canvas = cfg.canvas_size or round(
        cfg.global_size * 256 / 224
    )  # crops are cut from a square canvas (by default as large as evaluation's resize)
    gpu_aug, collate = None, collate_crops
    if (
        cfg.cache_pixels
    ):  # decoded once into a uint8 cache; batches augmented as tensors in the worker
        if info.enabled:  # rank 0 builds the cache, the others open it
            if info.is_main:
                CachedCanvases(bundle.train_plain, canvas, progress=cfg.progress)
            torch.distributed.barrier()
        cached = CachedCanvases(bundle.train_plain, canvas, progress=cfg.progress and info.is_main)
        if on_gpu:
            gpu_aug, collate = GPUMultiCrop.from_augmentation(augmentation), None
            train_set = SeededDataset(cached)
        else:
            train_set, collate = WithSeeds(cached), MultiCropCollate(augmentation)
    elif on_gpu:  # the CPU only decodes and resizes to a square canvas
        gpu_aug, collate = GPUMultiCrop.from_augmentation(augmentation), None
        train_set = SeededDataset(bundle.train_plain.with_transform(DecodeResize(canvas)))
    else:
        train_set = SeededDataset(bundle.train_aug)
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
    return TrainingData(bundle, loader, sampler, gpu_aug)


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
        scaler=torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16),
        amp_dtype=amp_dtype,
        steps_per_epoch=steps_per_epoch,
        schedules=Schedules(cfg, cfg.epochs * steps_per_epoch, global_batch),
    )


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
