"""Training-step throughput and peak memory: the tutorial's recipe vs ours, same model and batch.

The tutorial's recipe (``seed_baseline``): every crop at 224, fp32, all crops concatenated
into one forward pass, its per-parameter clipping loop and EMA loop. Ours is the shipped
step itself, :func:`dino_nb.step.train_step` on a :func:`~dino_nb.step.build_run` of the
``imagenette`` preset (the config's clip of 3, its schedules, last layer not frozen: the
steady state after the first epoch): uint8 crops normalised on the device, local crops at
96 (the paper's), one backbone pass per resolution (``MultiCropWrapper``),
``torch.autocast`` in bf16 where the hardware has it, ``clip_gradients`` (no host sync),
``param_groups`` (no decay on biases and norms) and ``ema_update`` (one fused lerp). Both
see the same number of crops per image (2 global + ``--n-local``) and the same batch.

Data loading is not timed (``bench_augment.py`` does that): the crops are random tensors.
Timed steps alternate between the contenders; the table shows medians. Peak memory: on
CUDA ``torch.cuda.max_memory_allocated``; on the CPU each contender runs again in a fresh
subprocess that reports how far its resident set grew during the steps (``ru_maxrss`` minus
the resident set before the first step). With ``--device cuda`` the table also shows the
model FLOPs of one step (``torch.utils.flop_counter``), the achieved FLOP/s and the model
FLOPs utilisation against the GPU's dense bf16/fp16 peak.

Usage:
    python benchmarks/bench_step.py                  # ViT-Tiny, batch 8, about 2 minutes on 2 cores
    python benchmarks/bench_step.py --quick          # a sanity run
    python benchmarks/bench_step.py --device cuda --model vit_small_patch16_224 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _common as C
import seed_baseline
import torch

from dino_nb.augment import normalize_uint8
from dino_nb.distributed import native_bf16, pick_device
from dino_nb.step import build_run, train_step
from dino_nb.tools.presets import preset

#: Dense bf16/fp16 tensor-core peak per GPU, FLOP/s (vendor data sheets; SXM where it differs).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
    "T4": 65e12,
    "P100": 18.7e12,
}

CONTENDERS = ("tutorial", "ours-bf16", "ours-fp32")


def peak_flops(name: str) -> float | None:
    """The table entry whose key appears in the GPU's name (longest key first)."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


class Contender:
    """One recipe: model, optimizer, inputs, and a ``step()`` that runs one training step."""

    def __init__(self, kind: str, args: argparse.Namespace, device: torch.device) -> None:
        self.kind, self.device = kind, device
        torch.manual_seed(0)
        b, n_local = args.batch, args.n_local
        if kind == "tutorial":
            self.student, self.teacher, self.loss, self.opt = seed_baseline.build(
                args.model, args.out_dim, device=device, batch_size=b
            )
            self.crops = [torch.randn(b, 3, 224, 224, device=device) for _ in range(2 + n_local)]
        else:
            precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
                contenders_amp(kind, device)
            ]
            cfg = preset(
                "imagenette",
                model=args.model,
                out_dim=args.out_dim,
                batch_size=b,
                n_local_crops=n_local,
                local_size=args.local_size,
                precision=precision,
                device=device.type,
                freeze_last_layer=0,
            )
            self.run = build_run(cfg, steps_per_epoch=1000)
            self.amp = self.run.amp_dtype
            self.iteration = 0
            sizes = [224, 224] + [args.local_size] * n_local
            # uint8 crops as the DataLoader delivers them with normalize=False
            self.crops = [
                torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device) for s in sizes
            ]

    def step(self) -> None:
        if self.kind == "tutorial":
            seed_baseline.train_step(
                self.student, self.teacher, self.loss, self.opt, self.crops, self.device
            )
            return
        crops = [normalize_uint8(c) for c in self.crops]
        train_step(self.run, crops, self.run.schedules[self.iteration])
        self.iteration += 1

    def flops(self) -> float:
        """Model FLOPs of one step (forward and backward), counted by torch."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return float(counter.get_total_flops())


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status``, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def probe_memory(kind: str, args: argparse.Namespace) -> dict:
    """Set up one contender in this process, warm it up, then measure its steps' peak memory.

    After one warm-up step (lazy initialisation, optimizer state) the resident set is read
    and the kernel's high-water mark reset (``/proc/self/clear_refs``), so the growth is
    what the steps themselves need: activations, gradients, temporaries. The parent sets
    ``MALLOC_MMAP_THRESHOLD_`` so that freed tensors go back to the OS at once.
    """
    C.set_threads(args.threads)
    contender = Contender(kind, args, torch.device("cpu"))
    contender.step()
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        peak_field = "VmHWM"
    except OSError:
        peak_field = ""
    for _ in range(args.steps):
        contender.step()
    if peak_field:
        peak = _status_kib(peak_field)
    else:  # no reset possible: the process-lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before": before * 1024, "peak": peak * 1024, "growth": max(peak - before, 0) * 1024}


def probe_argv(args: argparse.Namespace) -> list[str]:
    """The resolved settings as command-line arguments for a memory probe."""
    keys = ("model", "batch", "n_local", "local_size", "out_dim", "steps", "threads")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def cpu_memory(kind: str, argv: list[str]) -> dict | None:
    """``probe_memory`` in a fresh interpreter, so that one contender's peak cannot hide another's."""
    cmd = [sys.executable, __file__, *argv, "--probe", kind]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # big blocks: mmap, returned on free
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        print(f"memory probe of {kind} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny sanity run (ViT-Tiny, batch 2, one step)"
    )
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument(
        "--n-local", type=int, default=4, help="local crops per image (the tutorial: -c 6 = 2 + 4)"
    )
    p.add_argument(
        "--local-size", type=int, default=96, help="side of our local crops (the paper's 96)"
    )
    p.add_argument(
        "--out-dim", type=int, default=1024, help="head output dimension (the tutorial's 1024)"
    )
    p.add_argument("--steps", type=int, default=1, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per contender")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on an idle 2-core machine)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--probe", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.n_local, args.steps, args.repeats = 2, 2, 1, 1
    if args.probe:
        print(json.dumps(probe_memory(args.probe, args)))
        return
    threads = C.set_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    print(
        f"model {args.model}, batch {args.batch}, 2 + {args.n_local} crops, {args.steps} step(s) x "
        f"{args.repeats} runs; {C.machine_line(threads)}",
        flush=True,
    )

    contenders = {k: Contender(k, args, device) for k in CONTENDERS}
    for c in contenders.values():  # warm-up: allocator, kernels, lazy init
        c.step()
    flops = {k: c.flops() for k, c in contenders.items()}
    fns = {k: (lambda c=c: [c.step() for _ in range(args.steps)]) for k, c in contenders.items()}
    mem = {}
    if device.type == "cuda":
        for k, fn in fns.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            mem[k] = torch.cuda.max_memory_allocated()
    t0 = time.perf_counter()
    times = C.alternate(fns, args.repeats, device=args.device)
    print(f"timed in {time.perf_counter() - t0:.0f} s", flush=True)
    del contenders
    if device.type == "cpu" and not args.no_memory:
        for k in CONTENDERS:
            probe = cpu_memory(k, probe_argv(args))
            if probe is not None:
                mem[k] = probe["growth"]

    rate = {k: args.batch * args.steps / C.median(t) for k, t in times.items()}
    base = rate["tutorial"]
    header = ["recipe", "crops", "precision", "images/s", "ratio", "peak memory (MiB)"]
    gpu_name = torch.cuda.get_device_name() if device.type == "cuda" else None
    peak = peak_flops(gpu_name) if gpu_name else None
    header += ["GFLOP/step"] + (["TFLOP/s", "MFU"] if device.type == "cuda" else [])
    rows = []
    for k in CONTENDERS:
        crops = (
            f"{2 + args.n_local} x 224"
            if k == "tutorial"
            else f"2 x 224 + {args.n_local} x {args.local_size}"
        )
        prec = "fp32" if k != "ours-bf16" else str(contenders_amp(k, device)).replace("torch.", "")
        row = [
            k,
            crops,
            prec,
            rate[k],
            rate[k] / base,
            mem[k] / 2**20 if k in mem else float("nan"),
        ]
        row.append(flops[k] / 1e9)
        if device.type == "cuda":
            achieved = flops[k] * rate[k] / args.batch
            row += [achieved / 1e12, achieved / peak if peak else float("nan")]
        rows.append(row)
    where = gpu_name or "CPU"
    note = (
        "resident-set growth during the steps after a warm-up step"
        if device.type == "cpu"
        else "torch.cuda.max_memory_allocated"
    )
    C.print_table(
        f"Training step on {where}, {args.model}, batch {args.batch}: median of {args.repeats}; memory = {note}",
        header,
        rows,
    )
    if device.type == "cuda" and peak is None:
        print(f"(no peak-FLOPs entry for {gpu_name!r}; add one to PEAK_FLOPS for the MFU column)")
    if device.type == "cpu":
        print(
            f"bf16 autocast on this CPU is {rate['ours-bf16'] / rate['ours-fp32']:.2f}x the fp32 speed "
            "(> 1: the CPU has fast bf16, e.g. AVX512-BF16 or AMX)"
        )


def contenders_amp(kind: str, device: torch.device) -> torch.dtype:
    """The dtype a contender computes in: ``ours-bf16`` takes bf16 where the device has it natively.

    On the CPU bf16 autocast runs everywhere (whether it is fast is what the table shows). A
    CUDA card below compute capability 8.0 (T4, V100) only emulates bf16, slowly, though
    ``torch.cuda.is_bf16_supported()`` says yes: there the contender runs fp16, as
    ``--precision auto`` does.
    """
    if kind != "ours-bf16":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


if __name__ == "__main__":
    main()
