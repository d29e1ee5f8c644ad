"""The prepared GPU check: what one GPU does with dino-nb's shipped code, in one table.

Rows (every one runs :func:`dino_nb.engine.train_step` or :func:`dino_nb.train.train`):

1. training step of ViT-S/16 at 2x224 + 8x96, batch 64, in bf16, fp16 and fp32: images/s,
   peak memory, model FLOPs per step (``torch.utils.flop_counter``) and MFU against the
   card's dense bf16/fp16 peak (``bench_step.PEAK_FLOPS``);
2. the same bf16 step with ``--compile`` (compile time reported separately);
3. the whole loop (data included) with the CPU's PIL augmentation vs ``--gpu-augment``;
4. 200 steps of the ``imagenette`` preset on imagenette-mini (or generated JPEGs when the
   folder is absent): wall time and the kNN curve;
5. feature extraction for evaluation, autocast on: images/s.

About 5-8 minutes on one datacenter GPU. ``--quick`` shrinks everything to a CPU smoke test
(what ``tests/test_benchmarks.py`` runs). Usage::

    bash benchmarks/gpu_check.sh            # on the GPU machine
    python benchmarks/gpu_check.py --quick --device cpu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _common as C
import torch
from bench_step import peak_flops

from dino_nb.augment import normalize_uint8
from dino_nb.config import TrainConfig, preset
from dino_nb.data import build_datasets, make_loader, plain_transform
from dino_nb.engine import build_run, train_step
from dino_nb.evaluate import extract_features
from dino_nb.train import train


def step_row(cfg: TrainConfig, steps: int, device: torch.device) -> dict:
    """Time ``steps`` shipped steps on random uint8 crops after warm-up; FLOPs of one step."""
    run = build_run(cfg, steps_per_epoch=1000)
    sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.n_local_crops
    crops = [
        torch.randint(0, 256, (cfg.batch_size, 3, s, s), dtype=torch.uint8, device=device)
        for s in sizes
    ]
    t0 = time.perf_counter()
    for i in range(3):  # warm-up: kernels, allocator, compilation
        train_step(run, [normalize_uint8(c) for c in crops], run.schedules[i])
    C.sync(device)
    warmup = time.perf_counter() - t0
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if not cfg.compile:  # the counter does not see inside compiled graphs
        with counter:
            train_step(run, [normalize_uint8(c) for c in crops], run.schedules[3])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    C.sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(run, [normalize_uint8(c) for c in crops], run.schedules[4 + i])
    C.sync(device)
    seconds = time.perf_counter() - t0
    flops = float(counter.get_total_flops()) if not cfg.compile else float("nan")
    return {
        "images_per_s": cfg.batch_size * steps / seconds,
        "memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else float("nan"),
        "gflop_per_step": flops / 1e9,
        "warmup_s": warmup,
    }


def loop_row(cfg: TrainConfig) -> dict:
    """A short ``train()`` run; images/s of its last logged window (data loading included)."""
    result = train(cfg)
    records = [
        json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    knn = [f"{step}:{acc:.1%}" for step, acc in result.knn_history]
    return {"images_per_s": rates[-1], "seconds": result.seconds, "knn": " ".join(knn)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="a tiny CPU-sized smoke run of every row")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device visible (use --device cpu --quick for a smoke run)"
        )
    out = Path(args.out or tempfile.mkdtemp(prefix="dino_nb_gpu_check_"))
    root, described = C.image_folder_root(n_generated=80, size=(320, 240))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = peak_flops(name) if device.type == "cuda" else None
    print(f"{name}; torch {torch.__version__}; data: {described}", flush=True)

    base = preset("imagenette", device=device.type, freeze_last_layer=0)
    steps = 20
    if args.quick:  # shapes of ViT-Tiny at small sizes: seconds on a CPU
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
        )
        steps = 2
    rows = []
    precisions = ("bf16", "fp16", "fp32") if device.type == "cuda" else ("fp32",)
    for precision in precisions:
        r = step_row(replace(base, precision=precision), steps, device)
        mfu = (
            r["gflop_per_step"] * 1e9 * r["images_per_s"] / base.batch_size / peak
            if peak
            else float("nan")
        )
        rows.append(
            [f"step {precision}", r["images_per_s"], r["memory_gib"], r["gflop_per_step"], mfu, "-"]
        )
    if not args.quick:  # compiling takes minutes on a CPU
        compiled = step_row(replace(base, precision=precisions[0], compile=True), steps, device)
        rows.append(
            [
                f"step {precisions[0]} + compile",
                compiled["images_per_s"],
                compiled["memory_gib"],
                "-",
                "-",
                f"compile+warm-up {compiled['warmup_s']:.0f} s",
            ]
        )

    loop = replace(
        base,
        data=str(root),
        precision="auto",
        max_steps=steps * 2,
        log_every=steps,
        eval_every=10**6,
        eval_train_subset=64,
        projector_size=0,
        progress=False,
        resume="never",
        epochs=300,
        warmup_epochs=10,
        warmup_teacher_temp_epochs=30,
    )
    for gpu_aug in (False, True):
        r = loop_row(
            replace(loop, gpu_augment=gpu_aug, out=str(out / f"loop-gpu-augment-{gpu_aug}"))
        )
        rows.append(
            [
                f"loop, {'--gpu-augment' if gpu_aug else 'CPU PIL augment'}",
                r["images_per_s"],
                "-",
                "-",
                "-",
                f"{r['seconds']:.0f} s for {loop.max_steps} steps",
            ]
        )

    n200 = 4 if args.quick else 200
    r = loop_row(
        replace(
            loop,
            max_steps=n200,
            eval_every=max(1, n200 // 2),
            log_every=10,
            gpu_augment=True,
            eval_train_subset=5000,
            out=str(out / "imagenette-200"),
        )
    )
    rows.append(
        [
            f"imagenette preset, {n200} steps",
            r["images_per_s"],
            "-",
            "-",
            "-",
            f"{r['seconds']:.0f} s; kNN {r['knn']}",
        ]
    )

    bundle = build_datasets(str(root), plain_transform(base.global_size), base.global_size)
    workers = 0 if args.quick else 4
    loader = make_loader(
        bundle.train_plain, 256, num_workers=workers, pin_memory=device.type == "cuda"
    )
    backbone = build_run(base).teacher.backbone
    extract_features(backbone, loader)  # warm-up
    C.sync(device)
    t0 = time.perf_counter()
    features, _ = extract_features(backbone, loader)
    rows.append(
        [
            "evaluation features (autocast)",
            len(features) / (time.perf_counter() - t0),
            "-",
            "-",
            "-",
            f"{len(features)} images incl. decoding",
        ]
    )

    C.print_table(
        f"dino-nb GPU check on {name}: ViT-S/16 (--quick: a tiny ViT), batch {base.batch_size}, "
        f"2 x {base.global_size} + {base.n_local_crops} x {base.local_size}",
        ["row", "images/s", "peak GiB", "GFLOP/step", "MFU", "note"],
        rows,
    )


if __name__ == "__main__":
    main()
