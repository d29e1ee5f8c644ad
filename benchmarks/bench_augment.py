"""Multi-crop throughput of one data-loading worker: the readable pipeline vs the fast batched one.

The **readable** pipeline is the default path: per image, open + decode + convert to RGB,
:class:`dino_nb.augment.DataAugmentation` (torchvision's transforms on PIL images) makes
every view, and the batch is collated (uint8 crops, normalised later on the device). The
**fast** one is ``--cache-pixels``: :class:`dino_nb.fast.cache.MultiCropCollate` cuts a
whole batch's views at once with :class:`dino_nb.fast.crops.GPUMultiCrop`'s tensor ops from
canvases decoded once beforehand (the pixel cache; held in memory here), so its column
holds no decoding. Passes alternate between the two on the same images; the table shows
median images/s and the median of the per-pair speed ratios (fast / readable).

Rows:

- the main job (``python -m dino_nb.train``, preset ``cpu-quick``): the built-in shapes
  (64x64 PNGs), 2 x 48 + 4 x 24 crops, local scale (0.1, 0.4), batches of 32, canvas 55;
- the paper's views, 2 x 224 + 8 x 96, on photos: imagenette-mini's 224x224 JPEGs (the row
  is skipped when they are absent) or ``--photos WxH`` generated ones, canvas 256;
- the same photos with the fast column replaced by the CPU side of ``--gpu-augment``
  (decode + resize to the canvas; the crops are then made on the GPU). ``--device cuda``
  adds the device side of that path.

Usage:
    python benchmarks/bench_augment.py            # about a minute on 2 cores
    python benchmarks/bench_augment.py --quick    # a sanity run, seconds
    python benchmarks/bench_augment.py --photos 500x375   # larger (generated) photos
"""

from __future__ import annotations

import argparse
import itertools

import _common as C
import torch

from dino_nb.augment import DataAugmentation
from dino_nb.datasets import rgb_loader
from dino_nb.fast.cache import MultiCropCollate
from dino_nb.fast.crops import DecodeResize, GPUMultiCrop
from dino_nb.loader import collate_crops
from dino_nb.sources import ensure_builtin_dataset

#: The main job's views (preset ``cpu-quick``) and the paper's.
MAIN_JOB = dict(local_crops_scale=(0.1, 0.4), n_local_crops=4, global_size=48, local_size=24)
PAPER = dict(n_local_crops=8, global_size=224, local_size=96)


def readable_pass(paths, n_images, aug):
    """A function that loads, augments and collates ``n_images`` (cycling over ``paths``)."""
    it = itertools.cycle(paths)

    def run():
        return collate_crops([(aug(rgb_loader(next(it))), 0) for _ in range(n_images)])[0]

    return run


def fast_pass(paths, n_images, aug, canvas):
    """A function that cuts one batch's views from ``n_images`` canvases decoded beforehand."""
    decode = DecodeResize(canvas)
    canvases = [decode(rgb_loader(p)) for p in paths[: max(n_images, 64)]]
    it = itertools.cycle(canvases)
    collate = MultiCropCollate(aug)
    seeds = itertools.count()

    def run():
        return collate([(next(it), 0, next(seeds)) for _ in range(n_images)])[0]

    return run


def compare(fns, n_images, repeats):
    """Images/s of each contender (median) and the median paired speed ratio fast / readable."""
    for fn in fns.values():  # warm-up: file cache, lazy imports
        fn()
    t = C.alternate(fns, repeats)
    r, f = n_images / C.median(t["readable"]), n_images / C.median(t["fast"])
    return r, f, C.paired_ratio(t["readable"], t["fast"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sanity run")
    p.add_argument("--images", type=int, default=24, help="photos per timed pass")
    p.add_argument(
        "--batch", type=int, default=32, help="images per timed pass at the main job's sizes"
    )
    p.add_argument("--repeats", type=int, default=9, help="timed passes per contender")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one loader worker)")
    p.add_argument("--canvas", type=int, default=256, help="canvas of the photos' fast paths")
    p.add_argument(
        "--photos",
        default=None,
        metavar="WxH",
        help="use generated JPEGs of this size instead of imagenette-mini (e.g. 500x375, "
        "the typical full-size ImageNette photo; imagenette-mini's are 224x224)",
    )
    p.add_argument(
        "--device", default=None, help="also time GPUMultiCrop on this device (e.g. cuda)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats = 4, 4, 1
    threads = C.set_threads(args.threads)
    if args.photos:
        try:
            w, h = (int(v) for v in args.photos.lower().split("x"))
        except ValueError:
            p.error(f"--photos must look like 500x375, got {args.photos!r}")
        photos, source = C.image_folder_root(size=(w, h), generated=True)
    elif (C.MINI / "train").is_dir():
        photos, source = C.image_folder_root()
    else:
        photos, source = None, f"no photos ({C.MINI} absent; --photos WxH generates some)"
    print(f"photos: {source}; {args.repeats} passes; {C.machine_line(threads)}")

    rows = []
    shapes = C.jpeg_paths(ensure_builtin_dataset())
    aug = DataAugmentation(**MAIN_JOB, normalize=False)
    fns = {
        "readable": readable_pass(shapes, args.batch, aug),
        "fast": fast_pass(shapes, args.batch, aug, canvas=round(48 * 256 / 224)),
    }
    rows.append(["main job: built-in shapes, 2x48 + 4x24", *compare(fns, args.batch, args.repeats)])
    print(f"  {rows[-1][0]}: {rows[-1][1]:.0f} vs {rows[-1][2]:.0f} images/s", flush=True)

    if photos is not None:
        paths = C.jpeg_paths(photos)
        aug = DataAugmentation(**PAPER, normalize=False)
        readable = readable_pass(paths, args.images, aug)
        fns = {"readable": readable, "fast": fast_pass(paths, args.images, aug, args.canvas)}
        rows.append(["paper: photos, 2x224 + 8x96", *compare(fns, args.images, args.repeats)])
        print(f"  {rows[-1][0]}: {rows[-1][1]:.1f} vs {rows[-1][2]:.1f} images/s", flush=True)

        decode, it = DecodeResize(args.canvas), itertools.cycle(paths)

        def cpu_side():
            return torch.stack([decode(decode.open(next(it))) for _ in range(args.images)])

        fns = {"readable": readable, "fast": cpu_side}
        name = f"paper, fast = --gpu-augment's CPU side (decode + resize to {args.canvas})"
        rows.append([name, *compare(fns, args.images, args.repeats)])

    C.print_table(
        f"Multi-crop views, images/s in one worker ({threads} torch thread), median of {args.repeats}",
        ["setting", "readable", "fast", "ratio"],
        rows,
    )

    if args.device and photos is not None:
        device = torch.device(args.device)
        gpu_aug = GPUMultiCrop(**PAPER)
        canvases = cpu_side().to(device)
        gpu_aug(canvases)  # warm-up
        t = C.alternate(
            {"gpu": lambda: gpu_aug(canvases)}, max(args.repeats, 3), device=str(device)
        )
        C.print_table(
            f"GPUMultiCrop on {device}, paper settings, batch {len(canvases)} canvases of {args.canvas}",
            ["device", "images/s", "ms per batch"],
            [[str(device), len(canvases) / C.median(t["gpu"]), 1e3 * C.median(t["gpu"])]],
        )


if __name__ == "__main__":
    main()
