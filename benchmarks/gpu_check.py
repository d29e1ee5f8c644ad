"""The prepared GPU check: what one GPU does with dino-nb's shipped code, row by row.

It runs once, unattended, on a machine nobody can debug, within a fixed budget. So each row
is printed the moment it is measured and appended to ``gpu_check.md`` and ``gpu_check.jsonl``
(one JSON object a line, for a later session to parse) in ``benchmarks/results/``; a row
that fails prints its error and the check goes on; running out of memory is a row too; a row
whose estimate does not fit what is left of the budget (``--budget-s``, counted from the
start of ``gpu_check.sh``) is skipped and says so; the budget's end, or SIGTERM, cuts the
running row and ends the check with what it measured. The header comes first: card, memory,
compute capability, driver, torch, CUDA and cuDNN versions, then each row's estimate.

Rows, most telling first (each runs :func:`dino_nb.step.train_step` or
:func:`dino_nb.loop.train`):

1. ``step bf16`` / ``step fp16`` / ``step fp32``: one training step of ViT-S/16 at
   2 x 224 + 8 x 96, batch 64, on random uint8 crops: images/s, peak memory, model FLOPs per
   step (``torch.utils.flop_counter``) and MFU against the card's dense bf16/fp16 peak
   (``bench_step.PEAK_FLOPS``). bf16 only where the card computes it natively (compute
   capability 8.0+: :func:`dino_nb.distributed.native_bf16`; a T4 emulates it); fp16 on any
   CUDA card; fp32 with TF32 matmuls where the card has them, at batch 32 on cards under
   30 GiB (fp32 activations of batch 64 do not fit 16 GB).
2. ``loop, PIL augment`` / ``loop, gpu_augment``: the whole loop with its data (``train()``)
   on generated JPEGs of ImageNette's size (427 x 320, as imagenette2-320): images/s over the
   steps after a warm-up. The set holds more steps than the run, and ``save_every`` and
   ``eval_every`` exceed it, so no checkpoint and no evaluation falls inside the timed steps
   (``train()`` still evaluates at its start and end and saves at its end, outside them).
3. ``evaluation features``: :func:`dino_nb.evaluation.extract_features` (autocast), decoding
   included: images/s.
4. ``step + compile``: the mixed-precision step with ``compile=True``: compile time, then
   images/s. Last, as compiling takes minutes.

About 4.5 minutes on an H100/H200 and 5-6 on a T4 by its own estimates (printed up front).
``--quick`` shrinks every row to a CPU smoke test (what ``tests/test_benchmarks.py`` runs).
Usage::

    bash benchmarks/gpu_check.sh                          # on the GPU machine
    bash benchmarks/gpu_check.sh --quick --device cpu     # the smoke test, tens of seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import _common as C
import timm
import torch
from bench_step import peak_flops
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from dino_nb.augment import normalize_uint8
from dino_nb.config import TrainConfig
from dino_nb.datasets import plain_transform, rgb_loader
from dino_nb.distributed import native_bf16, resolve_precision
from dino_nb.evaluation import extract_features
from dino_nb.loader import default_num_workers, make_loader
from dino_nb.loop import train
from dino_nb.model import build_backbone
from dino_nb.step import build_run, train_step
from dino_nb.tools.presets import preset

COLUMNS = ("row", "images/s", "peak GiB", "GFLOP/step", "MFU", "s (est.)", "note")
ROWS = (
    "step bf16",
    "step fp16",
    "step fp32",
    "loop, PIL augment",
    "loop, gpu_augment",
    "evaluation features",
    "step + compile",
)
PHOTO_SIZE = (427, 320)  # imagenette2-320: shorter side 320, 4:3

# What the estimates assume before anything is measured; the first step row replaces the guess
# of the step time. They only decide what to skip: the table shows each estimate beside the
# measured seconds, to correct these numbers.
GFLOP_PER_IMAGE = 107.0  # ViT-S/16 step, 2 x 224 + 8 x 96, out_dim 65536 (FlopCounterMode, CPU)
ASSUMED_MFU = 0.2  # of the dense bf16/fp16 peak
UNKNOWN_PEAK = 100e12  # FLOP/s for a card missing from bench_step.PEAK_FLOPS
SETUP_S = {"step": 8.0, "loop": 25.0, "eval": 5.0, "compile": 150.0}  # models, workers, saves
PIL_RATE = 28.0  # images/s of one loader worker: 10 multi-crop views of a 427 x 320 JPEG (torchvision PIL transforms)
DECODE_RATE = 150.0  # images/s of one worker for gpu_augment: decode, resize to the canvas
QUICK_ESTIMATE_S = {"step": 5.0, "loop": 12.0, "eval": 4.0}  # --quick on a CPU


class Stop(BaseException):
    """End the check now: the budget ran out, or SIGTERM / Ctrl-C asked for it.

    A ``BaseException``, so the ``except Exception`` around each row lets it through.
    """

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class RowTimeout(BaseException):
    """The running row took far longer than its estimate (a hang?); the next row may still run."""


class Interrupts:
    """SIGALRM (a row's time limit or the budget's end), SIGTERM and SIGINT, as exceptions.

    They raise only while a row runs (``armed``), so a report line is never cut in half;
    between rows a signal is remembered in ``reason`` and ends the check before the next row.
    ``train()`` installs its own SIGTERM/SIGINT handlers while it runs: it stops after the
    current step and returns ``interrupted``, which :func:`loop_row` turns into :class:`Stop`.
    Loader workers inherit the handler when they fork; there it does nothing (``timeout``
    signals the whole process group, and a worker that died of it would turn the cut into a
    loader error): the main process decides, and workers exit when it is gone.
    """

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.pid = os.getpid()
        self.reason: str | None = None
        self.armed = False
        for s in (signal.SIGALRM, *self.NAMES):
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked loader worker
            return
        if signum == signal.SIGALRM:
            if self.budget.left() > 1.0:
                if self.armed:
                    self.armed = False
                    raise RowTimeout
                return
            self.reason = self.reason or f"budget of {self.budget.seconds:g} s reached"
        else:
            self.reason = self.reason or self.NAMES[signal.Signals(signum)]
        if self.armed:
            self.armed = False
            raise Stop(self.reason)

    def arm(self, seconds: float) -> None:
        """Let signals raise from here on; SIGALRM in ``seconds``."""
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
        self.armed = True

    def disarm(self) -> None:
        """Back to remembering signals; no SIGALRM pending."""
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass
class Budget:
    """Seconds the whole check may take, counted from ``start`` (a ``time.time()``)."""

    seconds: float
    start: float

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.time() - self.start

    def left(self) -> float:
        """Seconds left (negative once overdrawn)."""
        return self.seconds - self.elapsed()


class Report:
    """Every line on stdout and appended to ``gpu_check.md``; rows also to ``gpu_check.jsonl``.

    Each line is written and flushed as soon as it exists (the files are opened for each
    line), so whatever ends the process, the lines printed so far are in both files.
    """

    def __init__(self, results: Path, run_id: str) -> None:
        results.mkdir(parents=True, exist_ok=True)
        self.md = results / "gpu_check.md"
        self.jsonl = results / "gpu_check.jsonl"
        self.run_id = run_id
        self.statuses: dict[str, str] = {}

    def line(self, text: str = "") -> None:
        """One Markdown line: in the file first, then on stdout (what a reader sees is saved)."""
        with self.md.open("a") as f:
            f.write(text + "\n")
        print(text, flush=True)

    def record(self, kind: str, **values: Any) -> None:
        """One JSON line (NaN becomes null, so any JSON reader takes it)."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()
        }
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"run": self.run_id, "kind": kind, **clean}) + "\n")

    def table_header(self) -> None:
        """The table's first two lines."""
        self.line()
        self.line("| " + " | ".join(COLUMNS) + " |")
        self.line("|" + "|".join(" --- " for _ in COLUMNS) + "|")

    def row(
        self,
        name: str,
        status: str,
        note: str,
        seconds: float = float("nan"),
        estimate: float = float("nan"),
        **metrics: float,
    ) -> None:
        """A table row; ``status`` is ok, oom, error, skipped or cut (the note says why)."""
        self.statuses[name] = status
        nan = float("nan")
        cells = [
            name,
            _fmt(metrics.get("images_per_s", nan)),
            _fmt(metrics.get("peak_gib", nan)),
            _fmt(metrics.get("gflop_per_step", nan)),
            _fmt(metrics.get("mfu", nan), percent=True),
            _seconds(seconds, estimate),
            note if status == "ok" else f"{status}: {note}",
        ]
        self.record(
            "row",
            row=name,
            status=status,
            note=note,
            seconds=seconds,
            estimate_s=estimate,
            **metrics,
        )
        self.line("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")


def _seconds(seconds: float, estimate: float) -> str:
    if not math.isfinite(estimate):
        return "-"
    return f"{seconds:.1f} ({estimate:.0f})" if math.isfinite(seconds) else f"- ({estimate:.0f})"


def _workers(n: int) -> str:
    return f"{n} loader worker{'s' if n != 1 else ''}"


def _fmt(x: float, percent: bool = False) -> str:
    if not math.isfinite(x):
        return "-"
    if percent:
        return f"{x:.1%}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


# ----------------------------------------------------------------------------- the machine


def nvidia_smi(field: str) -> str:
    """One ``nvidia-smi --query-gpu`` field of the first GPU, or why there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"n/a ({type(err).__name__})"
    return out.strip().splitlines()[0] if out.strip() else "n/a"


def describe(device: torch.device) -> tuple[list[str], dict[str, Any]]:
    """Header lines and their values: the card (or CPU), driver, torch, CUDA, cuDNN, timm."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpus": cores,
        "loader_workers": default_num_workers(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            card=props.name,
            memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            native_bf16=native_bf16(device),
            peak_tflops=(peak_flops(props.name) or float("nan")) / 1e12,
            driver=nvidia_smi("driver_version"),
        )
        card = (
            f"{info['card']}, {info['memory_gib']:.1f} GiB, compute capability "
            f"{info['capability']} (native bf16: {'yes' if info['native_bf16'] else 'no'}), "
            f"dense bf16/fp16 peak {_fmt(info['peak_tflops'])} TFLOP/s, driver {info['driver']}"
        )
    else:
        info.update(card=platform.processor() or platform.machine(), memory_gib=float("nan"))
        card = f"CPU: {info['card']}"
    lines = [
        f"device: {card}",
        f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, timm {info['timm']}, "
        f"Python {info['python']}; {cores} CPUs, {_workers(info['loader_workers'])}",
    ]
    return lines, info


# ----------------------------------------------------------------------------- the rows


@dataclass
class Check:
    """What every row needs: device, base config, sizes, the estimates' inputs and the report."""

    device: torch.device
    base: TrainConfig
    quick: bool
    info: dict[str, Any]
    report: Report
    budget: Budget
    interrupts: Interrupts
    out: Path
    photos: Path | None = None
    step_seconds: float = float("nan")  # of the mixed-precision step at base.batch_size
    step_rate: float = float("nan")  # its images/s, which the loop rows compare with
    step_flops: float = float("nan")  # its model FLOPs, for the compiled step's MFU
    workers: int = 0
    loop_every: int = 2  # log_every of the loop rows: one window per worker cycle
    loop_warmup: int = 2  # steps before the timed windows
    loop_timed: int = 4  # timed steps
    eval_images: int = 16
    epoch_steps: int = 0  # steps in one epoch of the photos: more than the loop rows run

    @property
    def mixed(self) -> str:
        """The precision ``auto`` picks here: bf16, fp16, or (CPU) fp32."""
        dtype = resolve_precision("auto", self.device)
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]

    @property
    def fp32_batch(self) -> int:
        """Batch 64 in fp32 needs more than 16 GB: half of it on cards under 30 GiB."""
        small = self.device.type == "cuda" and self.info["memory_gib"] < 30
        return max(1, self.base.batch_size // 2) if small else self.base.batch_size

    def step_guess(self) -> float:
        """Seconds per mixed-precision step: measured, or from the card's peak FLOP/s."""
        if math.isfinite(self.step_seconds):
            return self.step_seconds
        peak = self.info.get("peak_tflops", float("nan")) * 1e12
        peak = peak if math.isfinite(peak) else UNKNOWN_PEAK
        return self.base.batch_size * GFLOP_PER_IMAGE * 1e9 / (peak * ASSUMED_MFU) + 0.01

    def fp32_factor(self) -> float:
        """fp32 step time / mixed step time: TF32 tensor cores (8.0+) or plain fp32 units."""
        return 3.0 if native_bf16(self.device) else 8.0

    def step_counts(self, seconds_per_step: float) -> int:
        """Timed steps of a step row: about 6 s of them, 5 to 20."""
        if self.quick:
            return 2
        return int(min(20, max(5, round(6.0 / max(seconds_per_step, 1e-3)))))


def step_row(check: Check, cfg: TrainConfig, steps: int) -> dict[str, Any]:
    """Time ``steps`` shipped steps on random uint8 crops after 3 warm-up steps; FLOPs of one step."""
    device = check.device
    run = build_run(cfg, steps_per_epoch=1000)
    sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.n_local_crops
    crops = [
        torch.randint(0, 256, (cfg.batch_size, 3, s, s), dtype=torch.uint8, device=device)
        for s in sizes
    ]

    def step(i: int) -> None:
        train_step(run, [normalize_uint8(c) for c in crops], run.schedules[i])

    t0 = time.perf_counter()
    for i in range(3):  # warm-up: kernels, allocator, autotuning, compilation
        step(i)
    C.sync(device)
    warmup = time.perf_counter() - t0
    flops = float("nan")
    if not cfg.compile:  # the counter does not see inside compiled graphs
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(3)
        flops = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    C.sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(4 + i)
    C.sync(device)
    seconds = time.perf_counter() - t0
    rate = cfg.batch_size * steps / seconds
    peak = check.info.get("peak_tflops", float("nan")) * 1e12
    mixed = cfg.precision != "fp32"
    return {
        "images_per_s": rate,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else float("nan"),
        "gflop_per_step": flops / 1e9,
        "mfu": flops * rate / cfg.batch_size / peak if mixed else float("nan"),
        "warmup_s": warmup,
        "step_s": seconds / steps,
    }


def loop_row(check: Check, gpu_augment: bool) -> dict[str, Any]:
    """A short ``train()`` on the generated photos; images/s of the steps after the warm-up.

    ``metrics.jsonl`` holds one ``images_per_s`` per ``log_every`` steps (the images of that
    window over its wall time); the windows after ``loop_warmup`` steps are pooled. No
    checkpoint and no evaluation falls inside them (see :func:`loop_config`).
    """
    cfg = loop_config(check, gpu_augment)
    try:
        result = train(cfg)
        if result.interrupted:  # train() took the SIGTERM / Ctrl-C and stopped early
            raise Stop("SIGTERM or Ctrl-C (taken by train())")
        records = [
            json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()
        ]
    finally:
        shutil.rmtree(cfg.out, ignore_errors=True)  # two checkpoints of up to 671 MiB
    logged = sorted((r["step"], r["images_per_s"]) for r in records if "images_per_s" in r)
    images = seconds = 0.0
    previous = 0
    for step, rate in logged:
        if previous >= check.loop_warmup:
            n = (step - previous) * cfg.batch_size
            images, seconds = images + n, seconds + n / rate
        previous = step
    if result.steps != cfg.max_steps or seconds == 0:
        raise RuntimeError(f"train() ran {result.steps} of {cfg.max_steps} steps, logged {logged}")
    memory = [r["gpu_memory_gb"] for r in records if "gpu_memory_gb" in r]
    rate = images / seconds
    share = (
        f", {rate / check.step_rate:.0%} of the step row's"
        if math.isfinite(check.step_rate)
        else ""
    )
    return {
        "images_per_s": rate,
        "peak_gib": max(memory) if memory else float("nan"),
        "note": (
            f"{_workers(check.workers)}; steps {check.loop_warmup + 1}-{cfg.max_steps} of an epoch of "
            f"{check.epoch_steps}{share}; train() {result.seconds:.0f} s"
        ),
    }


def loop_config(check: Check, gpu_augment: bool) -> TrainConfig:
    """The loop rows' run: no checkpoint, evaluation or epoch end inside its steps."""
    steps = check.loop_warmup + check.loop_timed
    tag = "gpu" if gpu_augment else "pil"
    return replace(
        check.base,
        data=str(check.photos),
        precision="auto",
        gpu_augment=gpu_augment,
        num_workers=check.workers,
        max_steps=steps,
        log_every=check.loop_every,
        eval_every=10**9,  # only train()'s own evaluations at step 0 and at the end
        save_every=10**9,  # only the final save, after the timed steps
        eval_train_subset=64,
        projector_size=0,
        progress=False,
        resume="never",
        out=str(check.out / f"loop-{tag}"),
    )


def eval_row(check: Check) -> dict[str, Any]:
    """``extract_features`` over ``eval_images`` photos, as the kNN evaluation runs it; second pass timed."""
    cfg = check.base
    dataset = ImageFolder(
        str(check.photos / "train"), plain_transform(cfg.global_size), loader=rgb_loader
    )
    subset = Subset(dataset, range(min(check.eval_images, len(dataset))))
    loader = make_loader(
        subset,
        cfg.batch_size_eval,
        num_workers=check.workers,
        pin_memory=check.device.type == "cuda",
    )
    backbone = build_backbone(cfg.model).to(check.device)
    extract_features(backbone, loader)  # warm-up: workers, kernels
    C.sync(check.device)
    t0 = time.perf_counter()
    features, _ = extract_features(backbone, loader)
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": len(features) / seconds,
        "note": f"{len(features)} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, decoding included, "
        f"{_workers(check.workers)}, batch {cfg.batch_size_eval}, autocast {check.mixed}",
    }


# ----------------------------------------------------------------------------- running them


@dataclass
class Row:
    """One row: its name, its estimate (seconds), how to measure it, or why it does not run."""

    name: str
    estimate: Callable[[], float]
    measure: Callable[[], dict[str, Any]]
    unavailable: str | None = None


def run_row(check: Check, row: Row) -> None:
    """Measure one row and report it, whatever happens; :class:`Stop` ends the check."""
    report, budget, interrupts = check.report, check.budget, check.interrupts
    if interrupts.reason:
        raise Stop(interrupts.reason)
    if row.unavailable:
        report.row(row.name, "skipped", row.unavailable)
        return
    estimate, left = row.estimate(), budget.left()
    if estimate > left:
        report.row(
            row.name,
            "skipped",
            f"budget (needs ~{estimate:.0f} s, {max(left, 0):.0f} s left)",
            estimate=estimate,
        )
        return
    t0 = time.monotonic()
    limit = min(left, max(4 * estimate, estimate + 120))  # a hang costs this, not the rest
    try:
        interrupts.arm(limit)
        try:
            result = row.measure()
        finally:
            interrupts.disarm()
    except RowTimeout:
        report.row(
            row.name, "cut", f"over its limit of {limit:.0f} s", time.monotonic() - t0, estimate
        )
    except Stop as stop:
        report.row(row.name, "cut", stop.why, time.monotonic() - t0, estimate)
        raise
    except Exception as err:  # one failing row must not end the check
        seconds = time.monotonic() - t0
        text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)
        if not oom:
            traceback.print_exc(file=sys.stderr)
        if interrupts.reason:  # e.g. loader workers killed by the same SIGTERM: a cut, not a bug
            report.row(row.name, "cut", f"{interrupts.reason} ({text})", seconds, estimate)
            raise Stop(interrupts.reason) from None
        report.row(row.name, "oom" if oom else "error", text, seconds, estimate)
    else:
        note = result.pop("note", "")
        report.row(row.name, "ok", note, time.monotonic() - t0, estimate, **result)
    finally:
        free_memory(check.device)


def free_memory(device: torch.device) -> None:
    """Drop what the last row left behind, so that an OOM does not spill into the next row."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured_step(check: Check, precision: str) -> Callable[[], dict[str, Any]]:
    """The step row at ``precision``; the first mixed-precision one calibrates the estimates."""

    def measure() -> dict[str, Any]:
        fp32 = precision == "fp32"
        cfg = replace(
            check.base,
            precision=precision,
            batch_size=check.fp32_batch if fp32 else check.base.batch_size,
        )
        guess = check.step_guess() * (
            check.fp32_factor() * cfg.batch_size / check.base.batch_size if fp32 else 1
        )
        previous = torch.get_float32_matmul_precision()
        if fp32 and check.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls (8.0+; ignored below)
        try:
            r = step_row(check, cfg, check.step_counts(guess))
        finally:
            torch.set_float32_matmul_precision(previous)
        if not fp32 and not math.isfinite(check.step_seconds):
            check.step_seconds, check.step_rate = r["step_s"], r["images_per_s"]
            check.step_flops = r["gflop_per_step"] * 1e9
        if fp32:
            tf32 = native_bf16(check.device) and check.device.type == "cuda"
            kind = "TF32 matmuls" if tf32 else "plain fp32"
        else:
            kind = f"autocast {precision}"
        r["note"] = f"batch {cfg.batch_size}, {kind}, warm-up {r.pop('warmup_s'):.1f} s"
        r.pop("step_s")
        return r

    return measure


def measured_compile(check: Check) -> dict[str, Any]:
    """The mixed-precision step row with ``compile=True``; the note gives the compile time."""
    cfg = replace(check.base, precision=check.mixed, compile=True)
    r = step_row(check, cfg, check.step_counts(check.step_guess()))
    r.pop("step_s")
    peak = check.info.get("peak_tflops", float("nan")) * 1e12
    # the counter does not see inside compiled graphs: the model FLOPs of the eager step
    r["gflop_per_step"] = check.step_flops / 1e9
    r["mfu"] = check.step_flops * r["images_per_s"] / cfg.batch_size / peak
    r["note"] = (
        f"{check.mixed}, compile + 3 warm-up steps {r.pop('warmup_s'):.0f} s; FLOPs of the eager step"
    )
    return r


def rows(check: Check) -> list[Row]:
    """The rows in the order they run, with their estimates (read when each row comes up)."""
    quick, cuda = check.quick, check.device.type == "cuda"
    batch = check.base.batch_size

    def steps_estimate(factor: float) -> float:
        if quick:
            return QUICK_ESTIMATE_S["step"]
        per_step = check.step_guess() * factor
        return SETUP_S["step"] + (4 + check.step_counts(per_step)) * per_step

    def loop_estimate(per_worker: float) -> float:
        if quick:
            return QUICK_ESTIMATE_S["loop"]
        loader = batch / (max(check.workers, 1) * per_worker)
        steps = check.loop_warmup + check.loop_timed
        return SETUP_S["loop"] + steps * max(check.step_guess(), loader)

    def eval_estimate() -> float:
        if quick:
            return QUICK_ESTIMATE_S["eval"]
        rate = min(max(check.workers, 1) * DECODE_RATE, 10 * batch / check.step_guess())
        return SETUP_S["eval"] + 2 * check.eval_images / rate

    bf16 = None
    if cuda and not native_bf16(check.device):
        bf16 = f"no native bf16 at compute capability {check.info['capability']} (emulated, slow)"
    fp32_factor = check.fp32_factor() * check.fp32_batch / batch
    return [
        Row("step bf16", lambda: steps_estimate(1.0), measured_step(check, "bf16"), bf16),
        Row(
            "step fp16",
            lambda: steps_estimate(1.0),
            measured_step(check, "fp16"),
            None if cuda else "fp16 autocast needs a GPU",
        ),
        Row("step fp32", lambda: steps_estimate(fp32_factor), measured_step(check, "fp32")),
        Row("loop, PIL augment", lambda: loop_estimate(PIL_RATE), lambda: loop_row(check, False)),
        Row("loop, gpu_augment", lambda: loop_estimate(DECODE_RATE), lambda: loop_row(check, True)),
        Row("evaluation features", eval_estimate, lambda: eval_row(check)),
        Row(
            "step + compile",
            lambda: SETUP_S["compile"] + steps_estimate(1.0),
            lambda: measured_compile(check),
            "--quick (compiling takes minutes on a CPU)" if quick else None,
        ),
    ]


def base_config(device: torch.device, quick: bool) -> TrainConfig:
    """ViT-S/16, batch 64, 2 x 224 + 8 x 96 (the imagenette preset); ``quick``: a tiny ViT."""
    base = preset("imagenette", device=device.type, freeze_last_layer=0)
    if quick:  # shapes of ViT-Tiny at small sizes: seconds on a CPU
        base = replace(
            base,
            model="vit_tiny_patch16_224",
            batch_size=4,
            n_local_crops=2,
            global_size=64,
            local_size=32,
            out_dim=256,
            hidden_dim=64,
            bottleneck_dim=32,
            batch_size_eval=8,
        )
    return base


def work_folder(device: torch.device) -> Path:
    """Where the loop rows' runs go: RAM (``/dev/shm``) on a GPU machine with room, so their
    final checkpoint saves (fsync of 671 MiB) cost no disk time; else a temporary folder."""
    shm = Path("/dev/shm")
    if device.type == "cuda" and shm.is_dir():
        try:
            if shutil.disk_usage(shm).free > 8 * 2**30:
                return Path(tempfile.mkdtemp(prefix="dino_nb_gpu_check_", dir=shm))
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="dino_nb_gpu_check_"))


def start_time() -> float:
    """When ``gpu_check.sh`` started (``GPU_CHECK_START``, seconds since the epoch), else now."""
    now = time.time()
    try:
        start = float(os.environ.get("GPU_CHECK_START", now))
    except ValueError:
        return now
    return start if 0 <= now - start < 600 else now  # a stale value from another shell: ignore


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0, 1 if a row failed with an error, 143/130 after SIGTERM/Ctrl-C."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="a tiny CPU-sized smoke run of every row")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds for the whole check, from the start of gpu_check.sh; rows that would not "
        "fit are skipped, the budget's end cuts the running row (default 420: 7 minutes)",
    )
    p.add_argument(
        "--results",
        default=str(C.REPO / "benchmarks" / "results"),
        help="folder of gpu_check.md and gpu_check.jsonl (appended to)",
    )
    p.add_argument(
        "--out", default=None, help="folder for the loop rows' runs (default: temporary)"
    )
    args = p.parse_args(argv)
    budget = Budget(args.budget_s, start_time())
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible (use --quick --device cpu for a smoke run)",
            file=sys.stderr,
        )
        return 2
    interrupts = Interrupts(budget)
    now = dt.datetime.now(dt.timezone.utc)
    report = Report(Path(args.results), now.strftime("%Y%m%dT%H%M%SZ"))
    report.line(
        f"## dino-nb GPU check, {now:%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}"
    )
    report.line()
    lines, info = describe(device)  # first CUDA call: seconds
    for text in lines:
        report.line(f"- {text}")
    report.record("header", budget_s=args.budget_s, quick=args.quick, **info)
    base = base_config(device, args.quick)
    out = Path(args.out) if args.out else work_folder(device)
    check = Check(device, base, args.quick, info, report, budget, interrupts, out)
    check.workers = info["loader_workers"]
    if not args.quick:  # a window per worker cycle: each worker delivers a whole batch
        check.loop_every = min(8, max(4, check.workers))
        check.loop_warmup, check.loop_timed = 2 * check.loop_every, 4 * check.loop_every
        check.eval_images = 2048

    # photos for the loop and evaluation rows: one epoch is longer than the loop's steps
    steps = check.loop_warmup + check.loop_timed
    n_train = base.batch_size * (steps + check.loop_every)
    n_train = max(n_train, check.eval_images)
    check.photos = C.generated_photos(n_train, n_val=64 if not args.quick else 8, size=PHOTO_SIZE)
    check.epoch_steps = n_train // base.batch_size
    report.line(
        f"- model {base.model}, batch {base.batch_size}, 2 x {base.global_size} + "
        f"{base.n_local_crops} x {base.local_size}, out_dim {base.out_dim}; loop rows: "
        f"{n_train} generated {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs (an epoch of "
        f"{check.epoch_steps} steps), {steps} steps, the last {check.loop_timed} timed"
    )
    plan = rows(check)
    estimates = [0.0 if r.unavailable else r.estimate() for r in plan]
    total = budget.elapsed() + sum(estimates)
    report.line(
        "- estimates (s): "
        + ", ".join(
            f"{r.name} {e:.0f}" for r, e in zip(plan, estimates, strict=True) if not r.unavailable
        )
        + f"; total with {budget.elapsed():.0f} s of set-up: {total:.0f} of the {args.budget_s:.0f} s budget"
    )
    report.line(f"- results: {report.md} and {report.jsonl}")
    report.table_header()

    stopped = None
    try:
        for i, row in enumerate(plan):
            try:
                run_row(check, row)
            except Stop as stop:
                stopped = stop.why
                for rest in plan[i:]:  # the table stays complete: every row says what it did
                    if rest.name not in report.statuses:
                        report.row(rest.name, "skipped", f"stopped: {stopped}")
                break
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    errors = [name for name, s in report.statuses.items() if s == "error"]
    measured = [name for name, s in report.statuses.items() if s in ("ok", "oom")]
    summary = (
        f"{len(measured)} of {len(ROWS)} rows measured in {budget.elapsed():.0f} s"
        + (f"; stopped: {stopped}" if stopped else "")
        + (f"; errors in {', '.join(errors)} (tracebacks on stderr)" if errors else "")
    )
    report.line()
    report.line(summary)
    report.record("end", stopped=stopped, elapsed_s=budget.elapsed(), statuses=report.statuses)
    if stopped and not stopped.startswith("budget"):
        return 130 if stopped == "Ctrl-C" else 143
    return 1 if errors else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # a cut row can leave loader workers or compile threads behind: leave without waiting for
    # them (everything reported is flushed; loader workers exit when they see their parent gone)
    os._exit(code)
