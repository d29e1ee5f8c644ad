"""The DINO training engine and its command line, ``python -m dino_nb.train``.

One step: student on all crops, teacher on the two global crops, :class:`~dino_nb.loss.Loss`,
backward, per-tensor gradient clipping, optimizer step, EMA update of the teacher. The
learning rate, weight decay, teacher momentum and teacher temperature follow per-iteration
schedules (DINO's official recipe). Evaluation (weighted kNN on a fixed subset), logging
(tqdm, TensorBoard, ``metrics.jsonl``) and checkpoints (atomic, exact resume) happen on
rank 0 only; ``torchrun`` launches several processes with DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt_io
from .augment import DataAugmentation, normalize_uint8
from .config import PRESETS, TrainConfig, preset
from .data import build_datasets, collate_crops, make_loader, projector_subset
from .distributed import DistInfo, mean_across_ranks, setup, teardown
from .evaluate import extract_features, sklearn_knn_accuracy, weighted_knn
from .gpu_augment import DecodeResize, GPUMultiCrop
from .loss import Loss
from .models import build_student_teacher
from .optim import cancel_gradients, clip_gradients, ema_update, param_groups
from .sampling import SeededDataset, TrainSampler, sample_seed
from .schedules import cosine_schedule, linear_warmup_schedule

#: Fields that must agree between a checkpoint and the run that resumes it.
_RESUME_MUST_MATCH = (
    "model",
    "model_kwargs",
    "out_dim",
    "hidden_dim",
    "bottleneck_dim",
    "head_layers",
    "norm_last_layer",
    "batch_size",
    "seed",
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        out_dir: the run folder.
        steps: optimizer steps done in total (including those before a resume).
        knn_history: ``[(step, weighted kNN top-1), ...]`` for every evaluation of this run.
        best_knn: best top-1 seen (including before a resume).
        interrupted: the run stopped early on SIGTERM or Ctrl-C, after saving a checkpoint.
        seconds: wall time of this call.
    """

    out_dir: Path
    steps: int
    knn_history: list[tuple[int, float]] = field(default_factory=list)
    best_knn: float = 0.0
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def checkpoint(self) -> Path:
        """Path of the last checkpoint."""
        return self.out_dir / ckpt_io.LAST


# ----------------------------------------------------------------------------- set-up


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``auto`` picks bf16 on GPUs that support it (Ampere and newer), fp16 on older ones
    (T4, P100, V100) and fp32 on the CPU.
    """
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --precision fp16 or auto")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def default_num_workers(device: torch.device) -> int:
    """Data workers: all cores but one on a GPU machine (capped at 8).

    On a CPU the cores also run the model, so one worker prepares batches beside it.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 1 if cores >= 2 else 0


def validate(cfg: TrainConfig) -> None:
    """Refuse contradictory or impossible options before any work starts (one clear line)."""
    problems = []
    if cfg.batch_size <= 0:
        problems.append(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.epochs <= 0:
        problems.append(f"epochs must be positive, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        problems.append(f"max_steps must be >= 0, got {cfg.max_steps}")
    if cfg.n_local_crops < 0:
        problems.append(f"the number of crops must be at least 2 (2 global), got {cfg.n_crops}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        problems.append(f"warmup_epochs ({cfg.warmup_epochs}) must be between 0 and epochs ({cfg.epochs})")
    if cfg.warmup_teacher_temp_epochs > cfg.epochs:
        problems.append(
            f"warmup_teacher_temp_epochs ({cfg.warmup_teacher_temp_epochs}) exceeds epochs ({cfg.epochs})"
        )
    for name in ("momentum_teacher", "momentum_teacher_end"):
        if not 0 <= getattr(cfg, name) <= 1:
            problems.append(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("teacher_temp", "warmup_teacher_temp", "student_temp", "base_lr"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.clip_grad < 0:
        problems.append(f"clip_grad must be >= 0 (0 turns it off), got {cfg.clip_grad}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"unknown precision {cfg.precision!r}")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_file():
        problems.append(f"--resume checkpoint not found: {cfg.resume}")
    for name in ("eval_every", "log_every", "save_every"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(cfg, name)}")
    if problems:
        raise ValueError("; ".join(problems))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random states, in forms that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


class _StopFlag:
    """SIGTERM and the first Ctrl-C ask the loop to stop after the current step.

    Kaggle and Colab end sessions with SIGTERM; Jupyter's "interrupt kernel" sends SIGINT.
    A second Ctrl-C raises ``KeyboardInterrupt`` at once. Handlers are installed only in the
    main thread and restored afterwards.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- evaluation


class KnnEvaluator:
    """Weighted kNN (and the tutorial's sklearn kNN) on fixed subsets of plain train and val.

    The subsets are drawn once with their own generator, so evaluation costs the same every
    time, never touches the training random state, and its numbers are comparable across
    steps.
    """

    def __init__(self, bundle: Any, cfg: TrainConfig, num_workers: int, pin_memory: bool) -> None:
        g = torch.Generator().manual_seed(cfg.seed)
        n_train = len(bundle.train_plain)
        subset = torch.randperm(n_train, generator=g)[: cfg.eval_train_subset].sort().values.tolist()
        self.train_loader = make_loader(
            torch.utils.data.Subset(bundle.train_plain, subset),
            cfg.batch_size_eval,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator(),
        )
        self.val_loader = make_loader(
            bundle.val_plain,
            cfg.batch_size_eval,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator(),
        )
        self.k = cfg.knn_k
        self.temperature = cfg.knn_temperature
        self.num_classes = len(bundle.classes)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """Scores of ``backbone``: weighted kNN top-1/top-5 and the sklearn kNN accuracy."""
        x_train, y_train = extract_features(backbone, self.train_loader)  # autocast on a GPU
        x_val, y_val = extract_features(backbone, self.val_loader)
        top1, top5 = weighted_knn(x_train, y_train, x_val, y_val, self.k, self.temperature, self.num_classes)
        return {"knn_top1": top1, "knn_top5": top5, "knn_sklearn": sklearn_knn_accuracy(x_train, y_train, x_val, y_val)}


# ----------------------------------------------------------------------------- the loop


def _infinite(loader: Any, sampler: TrainSampler, start_epoch: int, start_in_epoch: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(epoch, batch)`` forever, resuming inside ``start_epoch`` at ``start_in_epoch``."""
    epoch, skip = start_epoch, start_in_epoch
    while True:
        sampler.set_epoch(epoch, skip)
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def train(cfg: TrainConfig) -> TrainResult:
    """Train DINO with ``cfg``; the function behind the CLI and the notebooks.

    Returns:
        a :class:`TrainResult`. On SIGTERM or Ctrl-C the run saves a checkpoint and returns
        with ``interrupted=True``.

    Raises:
        ValueError: for contradictory options, before any work starts.
        FileNotFoundError: when the data is missing.
        NonFiniteLossError: when the loss becomes NaN or infinite.
    """
    validate(cfg)
    start_time = time.perf_counter()
    info = setup(cfg.device)
    try:
        return _train(cfg, info, start_time)
    finally:
        teardown(info)


def _train(cfg: TrainConfig, info: DistInfo, start_time: float) -> TrainResult:
    device = info.device
    amp_dtype = resolve_precision(cfg.precision, device)
    out_dir = _run_dir(cfg)
    if info.enabled:  # every rank must agree on the folder, e.g. a timestamp
        holder = [str(out_dir)]
        torch.distributed.broadcast_object_list(holder, src=0)
        out_dir = Path(holder[0])
    seed_everything(cfg.seed)  # the same on every rank: the teachers must start equal too

    # ---- data
    augmentation = DataAugmentation(
        cfg.global_crops_scale,
        cfg.local_crops_scale,
        cfg.n_local_crops,
        cfg.global_size,
        cfg.local_size,
        normalize=False,  # uint8 crops; normalised on the device after the copy
    )
    bundle = build_datasets(cfg.data, augmentation, cfg.global_size, strict=cfg.strict_data)
    gpu_aug = None
    if cfg.gpu_augment:
        # the CPU only decodes and resizes to a square canvas; crops and colours happen on the device
        gpu_aug = GPUMultiCrop.from_augmentation(augmentation)
        train_set = bundle.train_plain.with_transform(DecodeResize(round(cfg.global_size * 256 / 224)))
    else:
        train_set = bundle.train_aug
    num_workers = default_num_workers(device) if cfg.num_workers is None else cfg.num_workers
    pin = device.type == "cuda"
    sampler = TrainSampler(len(train_set), cfg.batch_size, cfg.seed, info.rank, info.world_size)
    train_loader = make_loader(
        SeededDataset(train_set),
        cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=None if gpu_aug else collate_crops,
        pin_memory=pin,
        generator=torch.Generator(),
    )
    niter_per_ep = sampler.steps_per_epoch
    total_steps = cfg.epochs * niter_per_ep
    last_step = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)

    # ---- model, loss, optimizer
    student, teacher = build_student_teacher(
        cfg.model,
        cfg.out_dim,
        pretrained=cfg.pretrained,
        hidden_dim=cfg.hidden_dim,
        bottleneck_dim=cfg.bottleneck_dim,
        n_layers=cfg.head_layers,
        norm_last_layer=cfg.norm_last_layer,
        drop_path_rate=cfg.drop_path_rate,
        model_kwargs=cfg.model_kwargs,
    )
    student, teacher = student.to(device), teacher.to(device)
    if info.enabled:  # from here on each rank draws its own drop-path masks
        seed_everything(cfg.seed + info.rank)
    teacher.eval()
    if cfg.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    dino_loss = Loss(cfg.out_dim, cfg.warmup_teacher_temp, cfg.student_temp, cfg.center_momentum).to(device)
    global_batch = cfg.batch_size * info.world_size
    optimizer = torch.optim.AdamW(param_groups(student))  # lr and wd are set every step
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    last_layer_params = list(student.new_head.last_layer.parameters())
    student_module = student
    if info.enabled:
        student = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- schedules, one value per iteration
    lr_schedule = cosine_schedule(
        cfg.base_lr * global_batch / 256, cfg.min_lr, cfg.epochs, niter_per_ep, cfg.warmup_epochs
    )
    wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter_per_ep)
    momentum_schedule = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, niter_per_ep)
    temp_schedule = linear_warmup_schedule(
        cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.epochs, niter_per_ep, cfg.warmup_teacher_temp_epochs
    )

    # ---- resume
    step, best_knn = 0, 0.0
    resume_from = _resume_path(cfg, out_dir)
    if resume_from is not None:
        state = ckpt_io.load(resume_from, map_location=device)
        _check_resumable(state["config"], cfg, resume_from)
        student_module.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        dino_loss.load_state_dict(state["loss"])
        step, best_knn = int(state["step"]), float(state.get("best_knn", 0.0))
        set_rng_state(state["rng"])
        if info.is_main:
            print(f"resuming from {resume_from} at step {step}", flush=True)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def save(path: Path, epoch: int) -> None:
        ckpt_io.save_atomic(
            {
                "student": student_module.state_dict(),
                "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "loss": dino_loss.state_dict(),
                "step": step,
                "epoch": epoch,
                "best_knn": best_knn,
                "config": cfg.to_dict(),
                "rng": rng_state(),
            },
            path,
        )

    # ---- logging (rank 0)
    result = TrainResult(out_dir=out_dir, steps=step, best_knn=best_knn)
    logger = _Logger(out_dir, cfg, info.is_main)
    evaluator = KnnEvaluator(bundle, cfg, num_workers, pin) if info.is_main else None

    def evaluate(epoch: int) -> None:
        nonlocal best_knn
        if evaluator is None:
            return
        t0 = time.perf_counter()
        scores = evaluator(teacher.backbone)
        scores["eval_seconds"] = time.perf_counter() - t0
        logger.log(step, epoch, scores)
        result.knn_history.append((step, scores["knn_top1"]))
        if scores["knn_top1"] > best_knn and step > 0:
            best_knn = scores["knn_top1"]
            ckpt_io.save_atomic(
                {
                    "student": student_module.state_dict(),
                    "teacher": teacher.state_dict(),
                    "config": cfg.to_dict(),
                    "step": step,
                    "knn_top1": best_knn,
                },
                out_dir / ckpt_io.BEST,
            )

    epoch = step // niter_per_ep
    if step == 0:
        evaluate(0)
    progress = logger.progress(total=last_step, initial=step)
    images_seen, window_start = 0, time.perf_counter()
    try:
        with _StopFlag() as stop:
            batches = _infinite(train_loader, sampler, epoch, step % niter_per_ep)
            while step < last_step:
                epoch, (images, _) = next(batches)
                it = step
                # -- schedules
                for i, group in enumerate(optimizer.param_groups):
                    group["lr"] = float(lr_schedule[it])
                    group["weight_decay"] = float(wd_schedule[it]) if i == 0 else 0.0
                dino_loss.teacher_temp = float(temp_schedule[it])
                # -- forward
                if gpu_aug is not None:  # images: (batch, 3, canvas, canvas) uint8
                    generator = torch.Generator(device).manual_seed(sample_seed(cfg.seed, step, info.rank))
                    crops = gpu_aug(images.to(device, non_blocking=True), generator)
                else:  # images: n_crops x (batch, 3, size, size) uint8
                    crops = [normalize_uint8(c.to(device, non_blocking=True)) for c in images]
                try:
                    with autocast():
                        teacher_output = teacher(crops[:2])  # only the 2 global views
                        student_output = student(crops)
                        loss = dino_loss(student_output, teacher_output)
                    loss_value = mean_across_ranks(loss.detach()).item()
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError(
                            f"the loss became {loss_value} at step {step}; the last good checkpoint is kept "
                            f"in {out_dir}. Try a lower --base-lr, --precision fp32, or a longer teacher "
                            "temperature warmup (--warmup-teacher-temp-epochs)"
                        )
                    # -- backward, clip, step
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        clip_gradients(student_module, cfg.clip_grad)
                    if epoch < cfg.freeze_last_layer:
                        cancel_gradients(last_layer_params)
                    scaler.step(optimizer)
                    scaler.update()
                except torch.cuda.OutOfMemoryError as e:
                    raise RuntimeError(
                        f"CUDA ran out of memory at batch size {cfg.batch_size}; try --batch-size "
                        f"{max(1, cfg.batch_size // 2)} or --precision bf16/fp16"
                    ) from e
                # -- EMA teacher update
                ema_update(teacher, student_module, float(momentum_schedule[it]))
                step += 1
                images_seen += global_batch

                # -- logging, evaluation, checkpoints
                if step % cfg.log_every == 0 or step == last_step:
                    now = time.perf_counter()
                    rate = images_seen / max(now - window_start, 1e-9)
                    images_seen, window_start = 0, now
                    logger.log(
                        step,
                        epoch,
                        {
                            "loss": loss_value,
                            "lr": float(lr_schedule[it]),
                            "wd": float(wd_schedule[it]),
                            "momentum": float(momentum_schedule[it]),
                            "teacher_temp": float(temp_schedule[it]),
                            "images_per_s": rate,
                            **_gpu_memory(device),
                        },
                    )
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                end_of_epoch = step % niter_per_ep == 0
                if step % cfg.eval_every == 0 and step != last_step:
                    evaluate(epoch)
                if info.is_main and (step % cfg.save_every == 0 or end_of_epoch) and step != last_step:
                    save(out_dir / ckpt_io.LAST, step // niter_per_ep)
                if stop.signal is not None:
                    result.interrupted = True
                    break
    finally:
        progress.close()

    if not result.interrupted:
        evaluate(epoch)
    if info.is_main:
        save(out_dir / ckpt_io.LAST, step // niter_per_ep)
        if not result.interrupted and cfg.projector_size > 0:
            logger.projector(teacher.backbone, bundle, cfg, step)
    logger.close()
    result.steps, result.best_knn = step, best_knn
    result.seconds = time.perf_counter() - start_time
    if info.is_main:
        if result.interrupted:
            print(f"stopped at step {step}; checkpoint saved to {out_dir / ckpt_io.LAST} "
                  f"(run the same command with --out {out_dir} to resume)", flush=True)
    return result


def _gpu_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def _resume_path(cfg: TrainConfig, out_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume)
    candidate = out_dir / ckpt_io.LAST
    return candidate if candidate.is_file() else None


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}"
        for k in _RESUME_MUST_MATCH
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: the run was started with other settings ({'; '.join(diffs)}); "
            "use another --out or --no-resume"
        )


class _Logger:
    """tqdm, TensorBoard and ``metrics.jsonl`` on rank 0; silent elsewhere."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.writer = None
        self.metrics = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json() + "\n")
        self.metrics = (out_dir / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but keep training without it
            return
        self.writer = SummaryWriter(str(cfg.tensorboard_dir or out_dir))
        self.writer.add_text("config", "```\n" + cfg.to_json() + "\n```")

    def progress(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc="DINO",
            unit="step",
            disable=not (self.enabled and self.cfg.progress),
            dynamic_ncols=True,
        )

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, **{k: float(v) for k, v in values.items()}}
        assert self.metrics is not None
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def projector(self, backbone: nn.Module, bundle: Any, cfg: TrainConfig, step: int) -> None:
        if self.writer is None:
            return
        from .evaluate import compute_embedding
        from .viz import write_projector

        per_class = max(1, cfg.projector_size // len(bundle.classes))
        loader = make_loader(projector_subset(bundle.val_plain, per_class), cfg.batch_size_eval)
        loader.dataset.classes = bundle.names  # type: ignore[attr-defined]  # human names for ImageNette
        embs, imgs, labels = compute_embedding(backbone, loader)
        write_projector(self.writer, embs, imgs, labels, step=step, tag="embedding")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def export_backbone(checkpoint: str | os.PathLike, path: str | os.PathLike, which: str = "teacher") -> Path:
    """Save one backbone of a checkpoint as a plain timm state_dict.

    ``timm.create_model(config["model"], num_classes=0, **config["model_kwargs"])`` loads
    it with ``load_state_dict`` and no missing keys. The paper evaluates the teacher.

    Returns:
        ``path``.
    """
    backbone, _ = ckpt_io.backbone_state_dict(checkpoint, which)
    return ckpt_io.save_atomic(backbone, path)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The CLI; the tutorial's option names are kept, with correct types."""
    p = argparse.ArgumentParser(
        prog="python -m dino_nb.train",
        description="Train DINO (self-distillation with no labels) on ImageNette or the built-in dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = TrainConfig()
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="starting configuration; auto: 'imagenette' on a GPU with ImageNette present, else 'cpu'")
    p.add_argument("--config", help="JSON file of TrainConfig fields, applied over the preset (options win)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    p.add_argument("--data", help="'builtin', 'imagenette' or a folder holding train/ and val/")
    p.add_argument("--out", help="run folder (default runs/<timestamp>); resumes when it holds a checkpoint")
    p.add_argument("--resume", help="checkpoint to resume from (default: the one in --out, if any)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", help=f"timm model name (default {d.model})")
    # the tutorial's options
    p.add_argument("-b", "--batch-size", type=int, help=f"per-process batch size (default {d.batch_size})")
    p.add_argument("-d", "--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("-l", "--logging-freq", type=int, dest="eval_every", help="steps between kNN evaluations")
    p.add_argument("--momentum-teacher", type=float, help="teacher EMA momentum at the start")
    p.add_argument("--momentum-teacher-end", type=float, help="teacher EMA momentum at the end (cosine)")
    p.add_argument("-c", "--n-crops", type=int, help="crops per image, 2 global + the rest local")
    p.add_argument("-e", "--n-epochs", type=int, dest="epochs")
    p.add_argument("-o", "--out-dim", type=int, help="head output dimension K")
    p.add_argument("-t", "--tensorboard-dir", help="TensorBoard folder (default: the run folder)")
    p.add_argument("--clip-grad", type=float, help="per-tensor gradient norm limit, 0 turns it off")
    p.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the last layer's weight norm at 1")
    p.add_argument("--batch-size-eval", type=int)
    p.add_argument("--teacher-temp", type=float, help="teacher temperature after warmup")
    p.add_argument("--warmup-teacher-temp", type=float)
    p.add_argument("--warmup-teacher-temp-epochs", type=int)
    p.add_argument("--student-temp", type=float)
    p.add_argument("--pretrained", action="store_true", default=None, help="start from timm's pretrained weights")
    p.add_argument("-w", "--weight-decay", type=float, help="weight decay at the start (cosine to --weight-decay-end)")
    p.add_argument("--weight-decay-end", type=float)
    # the engine's options
    p.add_argument("--base-lr", type=float, help="lr for a global batch of 256 (scaled linearly)")
    p.add_argument("--min-lr", type=float)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--freeze-last-layer", type=int, help="epochs with the last layer frozen")
    p.add_argument("--local-size", type=int, help="side of the local crops (96 in the paper)")
    p.add_argument("--global-size", type=int, help="side of the global crops")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbones")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--gpu-augment", action="store_true", default=None, help="augment on the GPU")
    p.add_argument("--eval-train-subset", type=int, help="training images in the kNN memory bank")
    p.add_argument("--save-every", type=int, help="steps between checkpoints")
    p.add_argument("--strict-data", action="store_true", default=None, help="unreadable images are fatal")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _auto_preset(args: argparse.Namespace) -> str:
    if not torch.cuda.is_available() or args.device == "cpu":
        return "cpu"
    if args.data not in (None, "imagenette", "builtin"):
        return "imagenette"
    try:
        from .data import find_imagenette

        find_imagenette()
        return "imagenette"
    except (ImportError, FileNotFoundError):
        return "cpu"


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parse the command line into a :class:`TrainConfig` (and whether to only print it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = _auto_preset(args) if args.preset == "auto" else args.preset
    overrides: dict[str, Any] = {}
    if args.config:
        try:
            overrides.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"argument --config: cannot read {args.config}: {e}")
    skip = {"preset", "print_config", "n_crops", "resume", "no_resume", "no_progress", "config"}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            overrides[key] = value
    if args.n_crops is not None:
        if args.n_crops < 2:
            parser.error(f"argument -c/--n-crops: must be at least 2 (the global crops), got {args.n_crops}")
        overrides["n_local_crops"] = args.n_crops - 2
    if args.resume and args.no_resume:
        parser.error("--resume and --no-resume contradict each other")
    if args.resume:
        overrides["resume"] = args.resume
    if args.no_resume:
        overrides["resume"] = "never"
    if args.no_progress:
        overrides["progress"] = False
    return preset(name, **overrides), args.print_config


def main(argv: list[str] | None = None) -> int:
    """Entry point: train, print a summary; errors become one line on stderr and exit code 2."""
    try:
        cfg, print_only = config_from_args(argv)
        if print_only:
            print(cfg.to_json())
            return 0
        result = train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLossError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        first = result.knn_history[0][1] if result.knn_history else float("nan")
        last = result.knn_history[-1][1] if result.knn_history else float("nan")
        print(
            f"done: {result.steps} steps in {result.seconds:.0f} s; weighted kNN top-1 "
            f"{first:.1%} -> {last:.1%} (best {result.best_knn:.1%}); run folder {result.out_dir}"
        )
    return 143 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
