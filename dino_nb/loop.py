"""The DINO training loop and its command line, ``python -m dino_nb.train``.

:func:`train` builds a :class:`~dino_nb.step.Run` and calls
:func:`~dino_nb.step.train_step` once per batch; around it, read top to bottom: the one
decision all ranks take after each step (the step count of a ``--minutes`` budget, a stop
on SIGTERM or Ctrl-C: :class:`~dino_nb.budget.Budget`), a loss check whenever the host
reads the loss, logging, weighted-kNN evaluation and checkpoints (the pieces of
:mod:`dino_nb.books`). Logging, evaluation and checkpoints happen on rank 0 only;
``torchrun`` launches several processes.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from .books import Checkpoints, Evaluation, Logger
from .budget import Budget, TimeBudget
from .config import TrainConfig, validate
from .distributed import DistInfo, barrier, mean_across_ranks, setup, teardown
from .loader import TrainingData, build_training_data, decide_gpu_augment, loader_workers
from .step import Run, build_run, seed_everything, train_step

#: Fields that must agree between a checkpoint and the run that resumes it.
_RESUME_MUST_MATCH = (
    "model",
    "model_kwargs",
    "out_dim",
    "hidden_dim",
    "bottleneck_dim",
    "head_layers",
    "norm_last_layer",
    "use_bn_in_head",
    "batch_size",
    "seed",
)

#: How the summary line names the evaluation score.
SCORE_NAMES = {"knn_top1": "weighted kNN top-1", "view_agreement": "view agreement"}

#: The clock of the time budget (a test may replace it with a fake one).
clock = time.monotonic


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        out_dir: the run folder.
        steps: optimizer steps done in total (including those before a resume).
        total_steps: the steps the schedules span (fixed by ``--minutes`` when given).
        knn_history: ``[(step, score), ...]`` for every evaluation of this run; the score is
            the weighted kNN top-1 with labels, the view agreement of the held-aside images
            for an unlabelled folder (see :func:`dino_nb.evaluation.view_agreement`).
        best_knn: best score seen (including before a resume).
        score: the name of that score: ``"knn_top1"`` or ``"view_agreement"``.
        interrupted: the run stopped early on SIGTERM or Ctrl-C, after saving a checkpoint.
        seconds: wall time of this call.
    """

    out_dir: Path
    steps: int = 0
    total_steps: int = 0
    knn_history: list[tuple[int, float]] = field(default_factory=list)
    best_knn: float = 0.0
    score: str = "knn_top1"
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def checkpoint(self) -> Path:
        """Path of the last checkpoint."""
        return self.out_dir / ckpt_io.LAST


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
    time_budget = TimeBudget(cfg.minutes, clock=clock) if cfg.minutes else None
    if time_budget is not None:
        time_budget.start()  # setup counts against the budget
    start_time = time.perf_counter()
    info = setup(cfg.device)
    try:
        result = _train(cfg, info, time_budget if info.is_main else None)
    finally:
        teardown(info)
    result.seconds = time.perf_counter() - start_time
    return result


def _train(cfg: TrainConfig, info: DistInfo, time_budget: TimeBudget | None) -> TrainResult:
    # -- the run: its folder, the checkpoint it continues, data and models
    run, data, result, saved = _start(cfg, info)
    cfg, out_dir, step = run.cfg, result.out_dir, result.steps

    # -- the bookkeeping: the step count, the logs, the evaluations, the checkpoints
    budget = Budget(run, time_budget, saved)
    logger = Logger(run, out_dir, first_step=step)
    evaluation = Evaluation(run, data, logger, budget, best=result.best_knn, clock=clock)
    checkpoints = Checkpoints(run, out_dir, evaluation, budget)
    last_step = budget.last_step  # where the run ends, as the ranks last agreed
    if step == 0:
        evaluation.evaluate(step)
    pending: list[torch.Tensor] = []  # losses of the steps the host has not looked at yet
    with _StopFlag() as stop, logger.progress(last_step, initial=step) as bar:
        batches = data.batches(step)
        while step < last_step:
            # -- one DINO step
            epoch, images = next(batches)
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == last_step
            crops = data.crops(images, step, run.device, cfg.seed, info.rank)
            out = _step_or_explain(run, crops, step, log_now)
            step += 1
            pending.append(out.loss)
            if step == result.steps + 1:
                logger.peak_memory(bar)

            # -- one decision for all ranks: the step count (time budget) and whether to stop
            agreed = budget.agree(step, signalled=stop.signal is not None)
            last_step = agreed.last_step
            if agreed.settled:  # the budget fixed the step count: the bar learns it
                bar.total = last_step
                bar.refresh()
            due_eval, due_save = evaluation.due(step, agreed), checkpoints.due(step, agreed)

            # -- look at the loss before anything is logged or saved; log
            if log_now or due_eval or due_save or agreed.stop:
                loss_value = _check_finite(pending, step, out_dir)
                bar.set_postfix(_postfix(loss_value, time_budget), refresh=False)
            if log_now:
                logger.log(step, epoch, loss_value, out.signals, bar)
            bar.update(1)

            # -- evaluation, checkpoints, stop
            if due_eval:
                evaluation.evaluate(step)
            if due_save:
                checkpoints.save(step)
            if agreed.stop:
                result.interrupted = agreed.stop == "signal"
                break

    # -- the end: a last evaluation unless a signal stopped the run, a checkpoint, the projector
    _finish(step, result.interrupted, evaluation, checkpoints, logger)
    barrier(info)  # no rank exits (and makes torchrun stop the others) while rank 0 still writes
    result.steps, result.total_steps = step, len(run.schedules)
    result.knn_history, result.best_knn = evaluation.history, evaluation.best
    result.score = evaluation.score
    return result


def _finish(
    step: int, interrupted: bool, evaluation: Evaluation, checkpoints: Checkpoints, logger: Logger
) -> None:
    """After the last step: evaluate (unless a signal stopped the run) and save.

    Then the projector of a finished run, or how to resume a stopped one; the logs close.
    """
    if not interrupted:
        evaluation.evaluate(step)
    checkpoints.save(step)
    if interrupted:
        checkpoints.how_to_resume(step)
    else:
        evaluation.projector(step)
    logger.close()


def _start(
    cfg: TrainConfig, info: DistInfo
) -> tuple[Run, TrainingData, TrainResult, dict[str, Any] | None]:
    """The run folder, the checkpoint the run continues (loaded, or ``None``), data and models."""
    out_dir = _run_dir(cfg, info)
    saved = _checkpoint_to_resume(cfg, out_dir)
    cfg = _decide_data_path(cfg, info, saved[0]["config"] if saved else None)
    seed_everything(cfg.seed)
    data = build_training_data(cfg, info)
    run = build_run(cfg, info, data.steps_per_epoch)
    result = TrainResult(out_dir=out_dir)
    if saved is not None:
        _resume(run, cfg, *saved, result)
    return run, data, result, saved[0] if saved else None


# ----------------------------------------------------------------------------- pieces of the loop


def _step_or_explain(run: Run, crops: list[torch.Tensor], step: int, signals: bool) -> Any:
    """:func:`train_step`, with CUDA's out-of-memory error turned into advice."""
    try:
        return train_step(run, crops, run.schedules[step], signals=signals)
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(
            f"CUDA ran out of memory at batch size {run.cfg.batch_size}; try --batch-size "
            f"{max(1, run.cfg.batch_size // 2)} or --precision bf16/fp16"
        ) from e


def _check_finite(pending: list[torch.Tensor], step: int, out_dir: Path) -> float:
    """Read the pending losses (one host sync), raise at the first non-finite one, return the last."""
    values = mean_across_ranks(torch.stack(pending)).tolist()  # (n_pending,), averaged over ranks
    first_step = step - len(values) + 1
    pending.clear()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the loss became {value} at step {first_step + i - 1}; the last good checkpoint is kept "
                f"in {out_dir}. Try a lower --base-lr, --precision fp32, or a longer teacher "
                "temperature warmup (--warmup-teacher-temp-epochs)"
            )
    return values[-1]


def _postfix(loss: float, budget: TimeBudget | None) -> dict[str, str]:
    postfix = {"loss": f"{loss:.3f}"}
    if budget is not None:
        left = max(0.0, budget.seconds_left())
        postfix["left"] = f"{int(left // 60)}:{int(left % 60):02d}"
    return postfix


def _run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    out_dir = (
        Path(cfg.out) if cfg.out else Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    if info.enabled:  # every rank must agree on the folder, e.g. a timestamp
        holder = [str(out_dir)]
        torch.distributed.broadcast_object_list(holder, src=0)
        out_dir = Path(holder[0])
    return out_dir


def _checkpoint_to_resume(cfg: TrainConfig, out_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint this run continues, loaded on the CPU, and its path; ``None`` to start afresh.

    On the CPU whatever the run's device: the random states must be CPU tensors, and the
    weights are copied into the models (already on their device) by ``load_state_dict``.
    """
    if cfg.resume == "never":
        return None
    path = Path(cfg.resume) if cfg.resume != "auto" else out_dir / ckpt_io.LAST
    if cfg.resume == "auto" and not (path.is_file() or ckpt_io.previous_path(path).is_file()):
        return None
    return ckpt_io.load_with_fallback(path, map_location="cpu")


def _decide_data_path(
    cfg: TrainConfig, info: DistInfo, saved: dict[str, Any] | None
) -> TrainConfig:
    """``cfg`` with ``gpu_augment="auto"`` decided once: as the run being resumed decided, else now."""
    if cfg.gpu_augment != "auto":
        return cfg
    if saved is not None and isinstance(saved.get("gpu_augment"), bool):
        on = saved["gpu_augment"]
        reason = f"crops on the {'GPU' if on else 'CPU'}, as the run being resumed decided"
    else:
        on, reason = decide_gpu_augment(cfg, info.device, loader_workers(cfg, info.device))
    if info.is_main and info.device.type == "cuda":
        print(f"data: {reason}", flush=True)
    return replace(cfg, gpu_augment=on)


def _resume(
    run: Run, cfg: TrainConfig, state: dict[str, Any], path: Path, result: TrainResult
) -> None:
    """Continue from a loaded checkpoint: weights, optimizer, step, best score, random states.

    Its step count is :class:`~dino_nb.budget.Budget`'s to continue.
    """
    _check_resumable(state["config"], cfg, path)
    run.load_checkpoint(state)
    result.steps, result.best_knn = int(state["step"]), float(state.get("best_knn", 0.0))
    by_rank = state.get("rng_by_rank")
    same_world = isinstance(by_rank, list) and len(by_rank) == run.info.world_size
    ckpt_io.set_rng_state(by_rank[run.info.rank] if same_world else state["rng"], run.device)
    if run.info.is_main:
        print(f"resuming from {path} at step {result.steps}", flush=True)


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


def export_backbone(
    checkpoint: str | os.PathLike, path: str | os.PathLike, which: str = "teacher"
) -> Path:
    """Save one backbone of a checkpoint as a plain timm state_dict.

    ``timm.create_model(config["model"], num_classes=0, **config["model_kwargs"])`` loads
    it with ``load_state_dict`` and no missing keys. The paper evaluates the teacher.

    Returns:
        ``path``.
    """
    backbone, _ = ckpt_io.backbone_state_dict(checkpoint, which)
    return ckpt_io.save_atomic(backbone, path)


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    saved = {**TrainConfig().to_dict(), **saved}  # a field added since the run takes its default
    diffs = [
        f"{k}: checkpoint {saved[k]!r} vs now {current[k]!r}"
        for k in _RESUME_MUST_MATCH
        if saved[k] != current[k]
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: the run was started with other settings ({'; '.join(diffs)}); "
            "use another --out or --no-resume"
        )


# ----------------------------------------------------------------------------- command line
