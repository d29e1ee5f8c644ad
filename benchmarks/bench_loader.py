"""Multi-crop loader throughput at small resolutions on few cores: the PIL path vs batched CPU paths.

Three ways to feed training, each through a ``DataLoader`` with one worker process, the
``TrainSampler`` and the batch size of a run, at a small-resolution setting (default:
2 x 64 + 6 x 32 crops from a 73-pixel canvas, batch 64):

- **PIL**: today's path, :class:`~dino_nb.augment.DataAugmentation` per image
  (``build_datasets(...).train_aug`` through ``SeededDataset``) and ``collate_crops``;
- **JPEG + batched**: every image decoded and resized to the canvas each time
  (:class:`~dino_nb.fast.crops.DecodeResize`, JPEG draft decoding), then
  :class:`~dino_nb.fast.cache.MultiCropCollate` draws all views of the batch at once;
- **cache + batched**: the canvases read from the memory-mapped pixel cache
  (:class:`~dino_nb.fast.cache.CachedCanvases`, built once; the build time is printed), then
  the same batched views.

Rounds alternate between the three (a, b, c, a, b, c, ...); each round starts a fresh
worker, discards its first batch (worker start-up) and times the next ``--batches``. The
table shows median images/s and the median per-round ratio to the PIL path. For reference
it times the shipped training step (``dino_nb.step.train_step``, fp32) of a small ViT
(timm, 64-pixel input, 8x8 patches, depth 6, width 192) on crops of the same sizes in the
main process: when the loader makes more images/s than the step eats, data loading is not
the bottleneck.

Data: ``--data`` (default ``../shared/data/imagenette-photos128`` when present, else the
built-in dataset). Other processes share the cores: the load average is printed before
and after; read ratios, not absolute speeds, when it is high.

Usage:
    python benchmarks/bench_loader.py            # a few minutes on 2 cores (first run builds the cache)
    python benchmarks/bench_loader.py --quick    # a sanity run
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
import torch
from torch.utils.data import DataLoader

from dino_nb.augment import DataAugmentation, normalize_uint8
from dino_nb.datasets import build_datasets
from dino_nb.fast.cache import CachedCanvases, MultiCropCollate, WithSeeds
from dino_nb.fast.crops import DecodeResize
from dino_nb.loader import SeededDataset, TrainSampler, collate_crops
from dino_nb.step import Run, build_run, train_step
from dino_nb.tools.presets import preset

#: ImageNette's train photos at 128x128, shared beside the checkout (absent in a fresh clone).
PHOTOS128 = C.REPO.parent / "shared" / "data" / "imagenette-photos128"
PATHS = ("PIL", "JPEG + batched", "cache + batched")


def step_rate(args: argparse.Namespace) -> tuple[float, float]:
    """Images/s and seconds per step of the shipped training step on a small ViT, same crops.

    With ``--preset``, the preset's own model and head (what that recipe trains).
    """
    if args.preset:
        cfg = preset(args.preset, precision="fp32", device="cpu", freeze_last_layer=0)
        return _time_step(build_run(cfg, steps_per_epoch=1000), args)
    vit = {
        "img_size": args.global_size,
        "patch_size": 8,
        "depth": 6,
        "embed_dim": 192,
        "num_heads": 3,
    }
    cfg = preset(
        "imagenette",
        model=args.model,
        model_kwargs=vit,
        out_dim=args.out_dim,
        batch_size=args.batch,
        n_local_crops=args.n_local,
        global_size=args.global_size,
        local_size=args.local_size,
        precision="fp32",
        device="cpu",
        freeze_last_layer=0,
    )
    return _time_step(build_run(cfg, steps_per_epoch=1000), args)


def _time_step(run: Run, args: argparse.Namespace) -> tuple[float, float]:
    sizes = [args.global_size] * 2 + [args.local_size] * args.n_local
    crops = [
        normalize_uint8(torch.randint(0, 256, (args.batch, 3, s, s), dtype=torch.uint8))
        for s in sizes
    ]
    it = iter(range(10**6))
    step = lambda: train_step(run, crops, run.schedules[next(it)])  # noqa: E731
    step()  # warm-up
    seconds = C.median(C.alternate({"step": step}, 1 if args.quick else 3)["step"])
    return args.batch / seconds, seconds


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def time_loader(loader: DataLoader, sampler: TrainSampler, epoch: int, batches: int) -> float:
    """Seconds for ``batches`` batches after a discarded first one (the worker's start-up)."""
    sampler.set_epoch(epoch)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    del it  # shuts the worker down before the next contender starts
    return elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a sanity run: 2 batches, one round")
    p.add_argument(
        "--data",
        default=None,
        help="dataset (default imagenette-photos128 when present, else builtin)",
    )
    p.add_argument("--global-size", type=int, default=64, help="side of the 2 global crops")
    p.add_argument("--local-size", type=int, default=32, help="side of the local crops")
    p.add_argument("--n-local", type=int, default=6, help="local crops per image")
    p.add_argument(
        "--canvas", type=int, default=73, help="canvas of the batched paths (64 * 256 / 224)"
    )
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--batches", type=int, default=6, help="timed batches per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds per path")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm name of the reference ViT")
    p.add_argument(
        "--out-dim", type=int, default=4096, help="head output dimension of the reference step"
    )
    p.add_argument("--no-step", action="store_true", help="skip the reference training step")
    p.add_argument(
        "--preset",
        default=None,
        help="take crops, batch, canvas and the reference step's model from a preset, e.g. cpu-photos",
    )
    args = p.parse_args(argv)
    if args.preset:
        cfg = preset(args.preset)
        args.global_size, args.local_size = cfg.global_size, cfg.local_size
        args.n_local, args.batch = cfg.n_local_crops, cfg.batch_size
        args.canvas = round(cfg.global_size * 256 / 224)
    if args.quick:
        args.batches, args.repeats = 2, 1
    threads = C.set_threads(args.threads)
    data = args.data or (str(PHOTOS128) if (PHOTOS128 / "train").is_dir() else "builtin")
    aug = DataAugmentation(
        n_local_crops=args.n_local,
        global_size=args.global_size,
        local_size=args.local_size,
        normalize=False,
    )
    bundle = build_datasets(data, aug, args.global_size)
    train = bundle.train_plain
    need = (args.batches + 1) * args.batch
    if len(train) < need:
        raise SystemExit(
            f"{bundle.root}/train holds {len(train)} images, fewer than the {need} one round needs; "
            "lower --batch or --batches"
        )
    print(
        f"data: {bundle.root} ({len(train)} train images); crops 2 x {args.global_size} + "
        f"{args.n_local} x {args.local_size}, canvas {args.canvas}, batch {args.batch}, "
        f"{args.batches} batches x {args.repeats} rounds, 1 loader worker; {C.machine_line(threads)}",
        flush=True,
    )

    decode = DecodeResize(args.canvas)
    decoded = train.with_transform(decode)
    decoded.loader = decode.open  # JPEG draft decoding, as the cache uses
    t0 = time.perf_counter()
    cached = CachedCanvases(train, args.canvas, progress=not args.quick)
    build_s = time.perf_counter() - t0
    size_mib = cached.array.nbytes / 2**20
    print(f"pixel cache: {cached.path} ({size_mib:.0f} MiB), ready in {build_s:.1f} s", flush=True)

    collate = MultiCropCollate(aug)
    datasets = {
        "PIL": (SeededDataset(bundle.train_aug), collate_crops),
        "JPEG + batched": (WithSeeds(decoded), collate),
        "cache + batched": (WithSeeds(cached), collate),
    }
    loaders = {}
    for name, (dataset, collate_fn) in datasets.items():
        sampler = TrainSampler(len(dataset), args.batch, seed=0)
        # make_loader's options but a worker per round (persistent workers would keep
        # prefetching after a round and steal time from the next contender)
        loader = DataLoader(
            dataset,
            args.batch,
            sampler=sampler,
            drop_last=True,
            num_workers=1,
            collate_fn=collate_fn,
        )
        loaders[name] = (loader, sampler)
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for r in range(args.repeats):
        for name, (loader, sampler) in loaders.items():
            times[name].append(time_loader(loader, sampler, r, args.batches))
    images = args.batches * args.batch
    rows = []
    for name in PATHS:
        rate = images / C.median(times[name])
        ratio = C.paired_ratio(times["PIL"], times[name])
        rows.append([name, rate, ratio, 1000 * C.median(times[name]) / args.batches])
    C.print_table(
        f"Loader with 1 worker, batch {args.batch}: median of {args.repeats} rounds of {args.batches} batches",
        ["path", "images/s", "x PIL", "ms/batch"],
        rows,
    )
    print(f"load average after the loaders: {loadavg()}", flush=True)

    if not args.no_step:
        rate, seconds = step_rate(args)
        print(
            f"\nreference: the training step (dino_nb.step.train_step), {args.model} with "
            f"{args.global_size} px input, patch 8, depth 6, width 192, out_dim {args.out_dim}, fp32, "
            f"batch {args.batch}, torch threads {threads}: {rate:.1f} images/s ({seconds:.2f} s/step); "
            f"load average {loadavg()}"
        )


if __name__ == "__main__":
    main()
