"""The DINO training loop and its command line, ``python -m dino_nb.train``.

:func:`train` builds a :class:`~dino_nb.engine.Run` and calls
:func:`~dino_nb.engine.train_step` once per batch; around it, read top to bottom: the
schedules' values, a loss check whenever the host reads the loss, logging (tqdm,
TensorBoard, ``metrics.jsonl``, collapse signals), weighted-kNN evaluation, checkpoints
(atomic, exact resume, one previous copy kept), a time budget (``--minutes``) that fixes
the number of steps after measuring them, and a clean stop on SIGTERM or Ctrl-C. Logging,
evaluation and checkpoints happen on rank 0 only; ``torchrun`` launches several processes.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt_io
from .books import TimeBudget
from .config import TrainConfig, validate
from .datasets import projector_subset
from .distributed import (
    DistInfo,
    agree,
    barrier,
    gather_objects,
    mean_across_ranks,
    setup,
    teardown,
)
from .evaluation import make_evaluator
from .loader import (
    TrainingData,
    build_training_data,
    decide_gpu_augment,
    loader_workers,
    make_loader,
)
from .loss import CollapseMonitor
from .step import Run, Schedules, build_run, seed_everything, train_step
from .tools.memory import memory_estimate

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
_SCORE_NAMES = {"knn_top1": "weighted kNN top-1", "view_agreement": "view agreement"}

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
            for an unlabelled folder (see :func:`dino_nb.evaluate.view_agreement`).
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
    budget = TimeBudget(cfg.minutes, clock=clock) if cfg.minutes else None
    if budget is not None:
        budget.start()  # setup counts against the budget
    start_time = time.perf_counter()
    info = setup(cfg.device)
    try:
        result = _train(cfg, info, budget if info.is_main else None)
    finally:
        teardown(info)
    result.seconds = time.perf_counter() - start_time
    return result


def _train(cfg: TrainConfig, info: DistInfo, budget: TimeBudget | None) -> TrainResult:
    out_dir = _run_dir(cfg, info)
    saved = _checkpoint_to_resume(cfg, out_dir)
    cfg = _decide_data_path(cfg, info, saved[0]["config"] if saved else None)
    seed_everything(cfg.seed)
    data = build_training_data(cfg, info)
    run = build_run(cfg, info, data.steps_per_epoch)
    result = TrainResult(out_dir=out_dir)
    timed = cfg.minutes is not None  # the schedules' length is not known yet
    if saved is not None:
        timed = not _resume(run, cfg, *saved, result)  # a resumed budget run keeps its length
    books = _Books(run, data, out_dir, result, budget if timed else None, timed)
    step = result.steps
    if step == 0:
        books.evaluate(step)
    if info.is_main and run.device.type == "cuda":
        _announce_memory(cfg, run)
    pending: list[torch.Tensor] = []  # losses of the steps the host has not looked at yet
    with _StopFlag() as stop, books.logger.progress(books.last_step(), initial=step) as bar:
        batches = data.batches(step)
        while step < books.last_step():
            # -- one DINO step
            epoch, images = next(batches)
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == books.last_step()
            crops = data.crops(images, step, run.device, cfg.seed, info.rank)
            out = _step_or_explain(run, crops, step, log_now)
            step += 1
            pending.append(out.loss)
            books.images_seen += run.global_batch
            if step == result.steps + 1 and info.is_main and run.device.type == "cuda":
                peak = _gpu_memory(run.device)["gpu_memory_gb"]
                bar.write(f"peak GPU memory after the first step: {peak:.1f} GiB")

            # -- one decision for all ranks: the step count (time budget) and whether to stop
            stopping = books.agree(step, signalled=stop.signal is not None, bar=bar)
            last = step if stopping else books.last_step()  # the final evaluation and save follow
            due_eval = step % cfg.eval_every == 0 and step != last
            due_save = (
                step % cfg.save_every == 0 or step % run.steps_per_epoch == 0
            ) and step != last

            # -- look at the loss before anything is logged or saved; log
            if log_now or due_eval or due_save or stopping:
                loss_value = _check_finite(pending, step, out_dir)
                bar.set_postfix(_postfix(loss_value, budget), refresh=False)
            if log_now:
                books.log(step, epoch, loss_value, out.signals, bar)
            bar.update(1)

            # -- evaluation, checkpoints, stop
            if due_eval:
                books.evaluate(step)
            if due_save:
                books.save(step)
            if stopping == "signal":
                result.interrupted = True
            if stopping:
                break

    if not result.interrupted:
        books.evaluate(step)
    books.save(step)
    books.close(step)
    barrier(info)  # no rank exits (and makes torchrun stop the others) while rank 0 still writes
    result.steps, result.total_steps = step, len(run.schedules)
    return result


class _Books:
    """The bookkeeping around the steps: evaluation, checkpoints, logs, the time budget.

    Rank 0 evaluates and writes; the other ranks only keep the step count in step.
    """

    def __init__(
        self,
        run: Run,
        data: TrainingData,
        out_dir: Path,
        result: TrainResult,
        budget: TimeBudget | None,
        timed: bool,
    ) -> None:
        cfg, main = run.cfg, run.info.is_main
        self.run, self.data, self.out_dir, self.result, self.budget = (
            run,
            data,
            out_dir,
            result,
            budget,  # rank 0's clock; the other ranks follow its decisions
        )
        self.fixed = not timed  # whether the schedules' length is final
        self.logger = _Logger(out_dir, cfg, main)
        self.evaluator = (
            make_evaluator(data.bundle, cfg, data.loader.num_workers, data.loader.pin_memory)
            if main
            else None
        )
        if self.evaluator is not None:
            result.score = self.evaluator.score_key
        self.monitor = CollapseMonitor(cfg.out_dim, warmup_steps=run.schedules.warmup_steps)
        self.images_seen, self.window_start = 0, time.perf_counter()

    def last_step(self) -> int:
        """Where the run stops; before a time budget is calibrated, open-ended (``sys.maxsize``)."""
        total = len(self.run.schedules) if self.fixed else sys.maxsize
        return total if self.run.cfg.max_steps is None else min(total, self.run.cfg.max_steps)

    def agree(self, step: int, signalled: bool, bar: Any) -> str | None:
        """After each step, one decision that every rank takes: the step count and whether to stop.

        Rank 0 holds the time budget: it lays the schedules over the budget's estimate and
        fixes their length once it has measured enough, and it sees the budget run out. A
        SIGTERM or Ctrl-C may reach any rank. Every rank learns all of it at the same step
        (:func:`~dino_nb.distributed.agree`), so they all run the same schedules and leave
        the loop together.

        Returns:
            ``"signal"``, ``"time"`` or ``None`` (go on).
        """
        planned, out_of_time = 0, False
        if self.budget is not None:
            self.budget.record_step()
            planned = self._follow_budget()
            out_of_time = self._out_of_time(step)
        signal_any, late, total, fixed = agree(
            [
                int(signalled),
                int(out_of_time),
                planned,
                int(self.budget is not None and self.budget.total is not None),
            ],
            self.run.info,
        )
        if not self.fixed and total and total != len(self.run.schedules):
            self._lay_schedules(total)
        if not self.fixed and fixed:
            self.fixed = True
            bar.total = self.last_step()
            bar.refresh()
        return "signal" if signal_any else "time" if late else None

    def _lay_schedules(self, total: int) -> None:
        self.run.schedules = Schedules(self.run.cfg, total, self.run.global_batch)
        self.monitor.warmup_steps = self.run.schedules.warmup_steps

    def _follow_budget(self) -> int:
        """The step count the budget plans now (0 while it is still warming up)."""
        budget = self.budget
        assert budget is not None
        if budget.total is not None:
            return budget.total
        if budget.steps_done <= budget.warmup_steps:
            return 0
        eval_every = self.run.cfg.eval_every
        return budget.total_steps(eval_every) if budget.calibrated else budget.estimate(eval_every)

    def _out_of_time(self, step: int) -> bool:
        """Whether a fixed time budget has only the final evaluation's time left, before the last step.

        The step count is fixed from the steps timed early; when the machine slows down later
        (other work starts), the budget still holds: the run stops here, with the schedules
        not finished, and says so.
        """
        budget = self.budget
        if budget is None or budget.total is None or step >= min(budget.total, self.last_step()):
            return False
        if budget.seconds_left() > budget.eval_seconds:
            return False
        print(
            f"time budget reached at step {step} of {budget.total}: the steps got slower than "
            "measured at the start (is other work running?); stopping here",
            file=sys.stderr,
            flush=True,
        )
        return True

    def evaluate(self, step: int) -> None:
        """Weighted kNN (or, unlabelled, view agreement) of the teacher; keep the best model by it."""
        if self.evaluator is None:
            return
        t0 = clock()
        scores = self.evaluator(self.run.teacher.backbone)
        scores["eval_seconds"] = clock() - t0
        if self.budget is not None:
            self.budget.record_eval(scores["eval_seconds"])
        self.logger.log(step, step // self.run.steps_per_epoch, scores)
        key = self.evaluator.score_key  # knn_top1, or view_agreement without labels
        self.result.knn_history.append((step, scores[key]))
        if scores[key] > self.result.best_knn and step > 0:
            self.result.best_knn = scores[key]
            best = self.run.checkpoint(step, **{key: self.result.best_knn})
            keep = ("student", "teacher", "config", "step", key)
            ckpt_io.save_atomic({k: best[k] for k in keep}, self.out_dir / ckpt_io.BEST)

    def save(self, step: int) -> None:
        """The checkpoint to resume from, keeping the previous one; rank 0 writes it.

        Every rank calls this at the same step: each one's random states travel to rank 0,
        so that a resumed rank draws what it would have drawn (drop-path masks differ by rank).
        """
        info = self.run.info
        rngs = gather_objects(ckpt_io.rng_state(self.run.device), info)
        if not info.is_main:
            return
        state = self.run.checkpoint(
            step,
            best_knn=self.result.best_knn,
            rng=rngs[0],
            rng_by_rank=rngs,
            total_steps=len(self.run.schedules),
            schedule_fixed=self.fixed,  # a resumed run continues these schedules
        )
        ckpt_io.save_atomic(state, self.out_dir / ckpt_io.LAST, keep_previous=True)

    def log(
        self, step: int, epoch: int, loss: float, signals: dict[str, torch.Tensor], bar: Any
    ) -> None:
        """One line of metrics.jsonl and TensorBoard; warn once if the signals say collapse."""
        now = time.perf_counter()
        values = self.run.schedules[step - 1]
        record = {
            "loss": loss,
            "lr": values.lr,
            "wd": values.weight_decay,
            "momentum": values.momentum,
            "teacher_temp": values.teacher_temp,
            "images_per_s": self.images_seen / max(now - self.window_start, 1e-9),
            **{k: mean_across_ranks(v).item() for k, v in signals.items()},
            **_gpu_memory(self.run.device),
        }
        self.images_seen, self.window_start = 0, now
        self.logger.log(step, epoch, record)
        warning = self.monitor.update(step, loss, record.get("batch_entropy"))
        if warning and self.run.info.is_main:
            bar.write(f"warning: {warning}", file=sys.stderr)

    def close(self, step: int) -> None:
        """The projector (rank 0, finished runs), then close the logs; say how to resume."""
        cfg, main = self.run.cfg, self.run.info.is_main
        labelled = self.data.bundle.labelled  # the projector colours points by class
        if main and not self.result.interrupted and cfg.projector_size > 0 and labelled:
            self.logger.projector(self.run.teacher.backbone, self.data.bundle, cfg, step)
        self.logger.close()
        if main and self.result.interrupted:
            print(
                f"stopped at step {step}; checkpoint saved to {self.out_dir / ckpt_io.LAST} "
                f"(run the same command with --out {self.out_dir} to resume)",
                flush=True,
            )


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


def _announce_memory(cfg: TrainConfig, run: Run) -> None:
    """Print the memory estimate before the first step (an estimate that fails must not stop a run)."""
    try:
        line = memory_estimate(cfg, run.amp_dtype, run.device).describe()
    except Exception as e:  # noqa: BLE001 - any model timm builds; the estimate is advice only
        line = f"memory estimate unavailable ({type(e).__name__}: {e})"
    print(line, flush=True)


def _gpu_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


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
) -> bool:
    """Continue from a loaded checkpoint; return whether the schedules' length is fixed."""
    _check_resumable(state["config"], cfg, path)
    run.load_checkpoint(state)
    result.steps, result.best_knn = int(state["step"]), float(state.get("best_knn", 0.0))
    by_rank = state.get("rng_by_rank")
    same_world = isinstance(by_rank, list) and len(by_rank) == run.info.world_size
    ckpt_io.set_rng_state(by_rank[run.info.rank] if same_world else state["rng"], run.device)
    fixed = bool(state.get("schedule_fixed", True))
    if fixed and state["config"].get("minutes") and "total_steps" in state:
        # a budget run continues the step count it fixed; a run without a budget follows
        # cfg.epochs, so a longer --epochs extends it
        run.schedules = Schedules(cfg, int(state["total_steps"]), run.global_batch)
    if run.info.is_main:
        print(f"resuming from {path} at step {result.steps}", flush=True)
    return fixed or cfg.minutes is None


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
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(cfg.tensorboard_dir or out_dir))
        self.writer.add_text("config", "```\n" + cfg.to_json() + "\n```")

    def progress(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=None if total == sys.maxsize else total,  # open-ended until a budget is fixed
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
        from .evaluation import compute_embedding
        from .notebook.figures import write_projector

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


def main(argv: list[str] | None = None) -> int:
    """Entry point: train, print a summary; errors become one line on stderr and exit code 2."""
    from .cli import config_from_args
    from .presets import describe_preset

    try:
        cfg, print_only, name = config_from_args(argv)
        if print_only:  # the why on stderr, so that stdout stays JSON (--config takes it back)
            print(describe_preset(name, cfg), file=sys.stderr)
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
            f"done: {result.steps} steps in {result.seconds:.0f} s; {_SCORE_NAMES[result.score]} "
            f"{first:.1%} -> {last:.1%} (best {result.best_knn:.1%}); run folder {result.out_dir}"
        )
    return 143 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
