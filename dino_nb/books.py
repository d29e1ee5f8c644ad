"""The training loop's records, one piece per job, written by rank 0.

:func:`dino_nb.loop.train` runs these around :func:`~dino_nb.step.train_step`, beside the
step count of :mod:`dino_nb.budget`:

* :class:`Evaluation`: the weighted kNN (or view agreement) every ``eval_every`` steps, the
  best score and ``best_model.pth``, TensorBoard's projector (:func:`write_projector`) at the end.
* :class:`Checkpoints`: the checkpoint to resume from, atomic, with every rank's random states.
* :class:`Logger`: ``metrics.jsonl``, TensorBoard scalars, the progress bar, and the collapse
  warning of :class:`CollapseMonitor`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import checkpoint as ckpt_io
from .augment import denormalize
from .budget import Budget, Decision
from .datasets import projector_subset
from .distributed import gather_objects, mean_across_ranks
from .evaluation import compute_embedding, make_evaluator
from .loader import TrainingData, make_loader
from .step import Run

# ----------------------------------------------------------------------------- evaluation


class Evaluation:
    """The teacher's weighted kNN top-1 (unlabelled: view agreement) every ``eval_every`` steps.

    The score is DINO's measure of progress without a probe; the best one after step 0
    picks ``best_model.pth`` (student, teacher, config, step, score: no optimizer). After a
    finished run, the teacher's embeddings go to TensorBoard's projector. Rank 0 evaluates.

    Args:
        run: the run whose teacher is evaluated.
        data: the run's data (its held-aside images, its loader's workers).
        logger: where the scores go.
        budget: told how long each evaluation takes.
        best: the best score so far (a resumed run's).
        clock: seconds, to time the evaluations (the time budget's clock).
    """

    def __init__(
        self,
        run: Run,
        data: TrainingData,
        logger: Logger,
        budget: Budget,
        best: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run, self.logger, self.budget, self.clock = run, logger, budget, clock
        self.bundle, loader = data.bundle, data.loader
        self.evaluator = (
            make_evaluator(data.bundle, run.cfg, loader.num_workers, loader.pin_memory)
            if run.info.is_main
            else None
        )
        #: the score's name: ``"knn_top1"``, or ``"view_agreement"`` without labels
        self.score = self.evaluator.score_key if self.evaluator is not None else "knn_top1"
        self.history: list[tuple[int, float]] = []  # (step, score) of this call's evaluations
        self.best = best

    def due(self, step: int, agreed: Decision) -> bool:
        """Whether step ``step`` ends with a periodic evaluation (the run's last has its own)."""
        last = step if agreed.stop else agreed.last_step
        return step % self.run.cfg.eval_every == 0 and step != last

    def evaluate(self, step: int) -> None:
        """Score the teacher, log it, and keep the model if the score is the best after step 0."""
        if self.evaluator is None:
            return
        t0 = self.clock()
        scores = self.evaluator(self.run.teacher.backbone)
        scores["eval_seconds"] = self.clock() - t0
        self.budget.record_eval(scores["eval_seconds"])
        self.logger.write(step, step // self.run.steps_per_epoch, scores)
        self.history.append((step, scores[self.score]))
        if scores[self.score] > self.best and step > 0:
            self.best = scores[self.score]
            best = self.run.checkpoint(step, **{self.score: self.best})
            keep = ("student", "teacher", "config", "step", self.score)
            path = self.logger.out_dir / ckpt_io.BEST
            ckpt_io.save_atomic({k: best[k] for k in keep}, path)

    def projector(self, step: int) -> None:
        """The teacher's embeddings of a class-balanced validation subset, in TensorBoard."""
        cfg, bundle, writer = self.run.cfg, self.bundle, self.logger.writer
        if writer is None or cfg.projector_size <= 0 or not bundle.labelled:  # coloured by class
            return
        per_class = max(1, cfg.projector_size // len(bundle.classes))
        loader = make_loader(projector_subset(bundle.val_plain, per_class), cfg.batch_size_eval)
        loader.dataset.classes = bundle.names  # type: ignore[attr-defined]  # human names for ImageNette
        embs, imgs, labels = compute_embedding(self.run.teacher.backbone, loader)
        write_projector(writer, embs, imgs, labels, step=step, tag="embedding")


def write_projector(
    log_dir_or_writer: str | os.PathLike | Any,
    embeddings: torch.Tensor,
    images: torch.Tensor | None,
    labels: Sequence[Any],
    step: int = 0,
    tag: str = "embedding",
    images_normalized: bool = False,
    thumbnail_size: int = 48,
) -> None:
    """Export embeddings to TensorBoard's projector, with labels and an image sprite.

    The tutorial's ``add_embedding`` call, fixed: images are denormalised correctly
    (:func:`~dino_nb.augment.denormalize`, when ``images_normalized``) and shrunk to
    thumbnails so the sprite stays within the projector's 8192 x 8192 limit.

    Args:
        log_dir_or_writer: a ``SummaryWriter`` (left open, flushed) or a folder for a new
            one (closed afterwards).
        embeddings: ``(n_samples, dim)``.
        images: ``(n_samples, 3, H, W)`` in [0, 1] (as :func:`~dino_nb.evaluation.compute_embedding`
            returns them), ImageNet-normalised with ``images_normalized=True``, or ``None``.
        labels: ``n_samples`` labels (class names or numbers).
        step: training step, the projector's checkpoint name.
        tag: name of the embedding in the projector.
        images_normalized: whether ``images`` still carry the ImageNet normalisation.
        thumbnail_size: largest side of a sprite thumbnail in pixels.
    """
    n = embeddings.shape[0]
    if embeddings.ndim != 2 or len(labels) != n or (images is not None and images.shape[0] != n):
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)}, {len(labels)} labels and "
            f"{None if images is None else tuple(images.shape)} images must describe the same samples"
        )
    label_img = None if images is None else _thumbnails(images, images_normalized, thumbnail_size)
    metadata = [str(x).replace("\t", " ").replace("\n", " ") for x in labels]
    own = isinstance(log_dir_or_writer, (str, os.PathLike))
    writer = SummaryWriter(str(log_dir_or_writer)) if own else log_dir_or_writer
    try:
        writer.add_embedding(
            embeddings.detach().float().cpu(),
            metadata=metadata,
            label_img=label_img,
            global_step=step,
            tag=tag,
        )
        writer.flush()
    finally:
        if own:
            writer.close()


def _thumbnails(images: torch.Tensor, normalized: bool, thumbnail_size: int) -> torch.Tensor:
    """``(n, 3, h, w)`` in [0, 1], small enough that ``n`` of them fit an 8192 x 8192 sprite."""
    label_img = images.detach().float().cpu()
    if normalized:
        label_img = denormalize(label_img)
    side = min(thumbnail_size, 8192 // math.ceil(math.sqrt(images.shape[0])))
    if max(label_img.shape[-2:]) > side:
        scale = side / max(label_img.shape[-2:])
        new = (
            max(1, round(label_img.shape[-2] * scale)),
            max(1, round(label_img.shape[-1] * scale)),
        )
        label_img = F.interpolate(
            label_img, size=new, mode="bilinear", antialias=True, align_corners=False
        )
    return label_img.clamp(0, 1)


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """The checkpoint to resume from: every ``save_every`` steps, at each epoch's end, at the end.

    Written atomically with the previous copy kept (a crash mid-save loses nothing), by rank
    0; every rank's random states travel to it, so that a resumed rank draws what it would
    have drawn (drop-path masks differ by rank). Resuming is exact.

    Args:
        run: the run to save.
        out_dir: the run folder.
        evaluation: its best score goes with the checkpoint.
        budget: its step count goes with the checkpoint.
    """

    def __init__(self, run: Run, out_dir: Path, evaluation: Evaluation, budget: Budget) -> None:
        self.run, self.evaluation, self.budget = run, evaluation, budget
        self.path = out_dir / ckpt_io.LAST

    def due(self, step: int, agreed: Decision) -> bool:
        """Whether step ``step`` ends with a periodic save (the run's last has its own)."""
        last = step if agreed.stop else agreed.last_step
        every = step % self.run.cfg.save_every == 0 or step % self.run.steps_per_epoch == 0
        return every and step != last

    def save(self, step: int) -> None:
        """Save at step ``step``; every rank calls this at the same step (a collective)."""
        info = self.run.info
        rngs = gather_objects(ckpt_io.rng_state(self.run.device), info)
        if not info.is_main:
            return
        state = self.run.checkpoint(
            step,
            best_knn=self.evaluation.best,
            rng=rngs[0],
            rng_by_rank=rngs,
            **self.budget.state(),
        )
        ckpt_io.save_atomic(state, self.path, keep_previous=True)

    def how_to_resume(self, step: int) -> None:
        """After a stop on a signal: where the checkpoint is, and the command that continues."""
        if self.run.info.is_main:
            print(
                f"stopped at step {step}; checkpoint saved to {self.path} "
                f"(run the same command with --out {self.path.parent} to resume)",
                flush=True,
            )


# ----------------------------------------------------------------------------- logging


class Logger:
    """``metrics.jsonl``, TensorBoard scalars and the tqdm bar on rank 0; silent elsewhere.

    Each logged step writes the loss, the schedules' values, the images per second since the
    last line, the collapse signals (averaged over ranks) and the peak GPU memory; a
    :class:`CollapseMonitor` watches them and warns once.

    Args:
        run: the run to log.
        out_dir: the run folder; ``config.json`` is written there at once.
        first_step: the step this call starts at (a resumed run's).
    """

    def __init__(self, run: Run, out_dir: Path, first_step: int = 0) -> None:
        cfg, self.run, self.out_dir = run.cfg, run, out_dir
        self.enabled = run.info.is_main
        self.writer: SummaryWriter | None = None
        self.metrics = None
        self.monitor = CollapseMonitor(cfg.out_dim, warmup_steps=run.schedules.warmup_steps)
        if self.enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(cfg.to_json() + "\n")
            self.metrics = (out_dir / "metrics.jsonl").open("a")
            self.writer = SummaryWriter(str(cfg.tensorboard_dir or out_dir))
            self.writer.add_text("config", "```\n" + cfg.to_json() + "\n```")
        self._window = (first_step, time.perf_counter())  # since the last line: for images/s

    def progress(self, total: int, initial: int) -> tqdm:
        """The progress bar; open-ended (no total) until a time budget fixes the step count."""
        return tqdm(
            total=None if total == sys.maxsize else total,
            initial=initial,
            desc="DINO",
            unit="step",
            disable=not (self.enabled and self.run.cfg.progress),
            dynamic_ncols=True,
        )

    def log(
        self, step: int, epoch: int, loss: float, signals: dict[str, torch.Tensor], bar: tqdm
    ) -> None:
        """One step's line; a collapse warning the first time the signals say collapse."""
        now, (since, start) = time.perf_counter(), self._window
        values = self.run.schedules[step - 1]
        record = {
            "loss": loss,
            "lr": values.lr,
            "wd": values.weight_decay,
            "momentum": values.momentum,
            "teacher_temp": values.teacher_temp,
            "images_per_s": (step - since) * self.run.global_batch / max(now - start, 1e-9),
            **{k: mean_across_ranks(v).item() for k, v in signals.items()},
            **gpu_memory(self.run.device),
        }
        self._window = (step, now)
        self.write(step, epoch, record)
        self.monitor.warmup_steps = self.run.schedules.warmup_steps  # the budget may re-lay them
        warning = self.monitor.update(step, loss, record.get("batch_entropy"))
        if warning and self.enabled:
            bar.write(f"warning: {warning}", file=sys.stderr)

    def peak_memory(self, bar: tqdm) -> None:
        """On a GPU, the memory the first step took: what the batch size really costs."""
        if self.enabled and self.run.device.type == "cuda":
            peak = gpu_memory(self.run.device)["gpu_memory_gb"]
            bar.write(f"peak GPU memory after the first step: {peak:.1f} GiB")

    def write(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """One line of ``metrics.jsonl`` and one TensorBoard scalar per value."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, **{k: float(v) for k, v in values.items()}}
        assert self.metrics is not None and self.writer is not None
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Close ``metrics.jsonl`` and TensorBoard's writer."""
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def gpu_memory(device: torch.device) -> dict[str, float]:
    """``{"gpu_memory_gb": peak}`` on a GPU (GiB allocated at most so far); ``{}`` elsewhere."""
    if device.type != "cuda":
        return {}
    return {"gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


# ----------------------------------------------------------------------------- collapse


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
