"""Batched multi-crop throughput: the hand-written ``GPUMultiCrop`` vs the same views from kornia.

Both contenders take the same ``(B, 3, canvas, canvas)`` uint8 batch (real photos through
:class:`~dino_nb.fast.crops.DecodeResize`) and return every view, normalised float32:
:class:`dino_nb.fast.crops.GPUMultiCrop` and ``kornia_multicrop.KorniaMultiCrop`` (this
folder: the closest ``kornia.augmentation`` pipeline, same arguments, probabilities and
seeding). Calls alternate between the two on the same batch, each with a freshly seeded
generator; the table shows median images/s and the median of the per-pair time ratios
(kornia's time / the hand-written one's: above 1, the hand-written code is faster).

Rows, each at every ``--threads`` count:

- the paper's views from a 256 canvas: 2 x 224 + 8 x 96, batch 32 (``--gpu-augment``);
- small photos on the CPU: a 73 canvas, 2 x 64 + 6 x 32, batch 64 (the batched tensor path
  in a ``DataLoader`` worker, where per-operation overhead weighs more).

Without kornia installed (``pip install kornia``) its columns read n/a.

Usage:
    python benchmarks/bench_gpu_augment.py                  # about 3 minutes on 2 cores
    python benchmarks/bench_gpu_augment.py --quick          # a sanity run, seconds
    python benchmarks/bench_gpu_augment.py --device cuda    # the same rows on the GPU
"""

from __future__ import annotations

import argparse
import itertools

import _common as C
import torch

from dino_nb.fast.crops import DecodeResize, GPUMultiCrop

try:
    from kornia_multicrop import KorniaMultiCrop
except ImportError:  # kornia is not a dependency of the package
    KorniaMultiCrop = None

#: (name, canvas, global size, local size, local crops, batch)
SETTINGS = (
    ("canvas 256: 2x224 + 8x96", 256, 224, 96, 8, 32),
    ("canvas 73: 2x64 + 6x32", 73, 64, 32, 6, 64),
)


def canvases(paths: list[str], canvas: int, batch: int, device: torch.device) -> torch.Tensor:
    """A ``(batch, 3, canvas, canvas)`` uint8 batch of photos (cycling over ``paths``)."""
    decode = DecodeResize(canvas)
    it = itertools.cycle(paths)
    return torch.stack([decode(decode.open(next(it))) for _ in range(batch)]).to(device)


def seeded_calls(aug, images: torch.Tensor):
    """A function that calls ``aug(images, generator)`` with seeds 0, 1, 2, ... in turn."""
    seeds = itertools.count()
    return lambda: aug(images, torch.Generator(images.device).manual_seed(next(seeds)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sanity run")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per contender")
    p.add_argument(
        "--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)"
    )
    p.add_argument("--device", default="cpu", help="where the views are made (cpu, cuda)")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    settings = SETTINGS
    if args.quick:
        args.repeats, threads = 1, [1]
        settings = [(name, c, g, lc, n, 4) for name, c, g, lc, n, _ in SETTINGS]
    device = torch.device(args.device)
    root, source = C.image_folder_root()
    paths = C.jpeg_paths(root)
    print(f"images: {source}; {args.repeats} calls per contender; device {device}")

    rows = []
    for n_threads in threads:
        C.set_threads(n_threads)
        print(C.machine_line(n_threads), flush=True)
        for name, canvas, size, local_size, n_local, batch in settings:
            images = canvases(paths, canvas, batch, device)
            kw = dict(n_local_crops=n_local, global_size=size, local_size=local_size)
            contenders = {"hand": GPUMultiCrop(**kw)}
            if KorniaMultiCrop is not None:
                contenders["kornia"] = KorniaMultiCrop(**kw)
            fns = {key: seeded_calls(aug, images) for key, aug in contenders.items()}
            for fn in fns.values():  # warm-up: lazy imports, allocator, kernels
                fn()
            t = C.alternate(fns, args.repeats, device=str(device))
            hand = batch / C.median(t["hand"])
            if "kornia" in t:
                kornia = batch / C.median(t["kornia"])
                ratio = C.paired_ratio(t["kornia"], t["hand"])
            else:
                kornia = ratio = float("nan")
            rows.append([f"{name}, batch {batch}", n_threads, hand, kornia, ratio])
            print(
                f"  {name}, {n_threads} thread(s): {hand:.1f} vs {kornia:.1f} images/s", flush=True
            )

    C.print_table(
        f"Multi-crop views of uint8 canvases on {device}, images/s, median of {args.repeats}",
        ["setting", "threads", "hand-written", "kornia", "ratio"],
        rows,
    )
    if KorniaMultiCrop is None:
        print("\nkornia is not installed: `pip install kornia` to compare.")


if __name__ == "__main__":
    main()
