"""Multi-crop augmentation throughput of one data-loading worker: the tutorial's vs ours.

Each pass reads ``--images`` JPEGs (open + decode + convert to RGB), augments each into
all its views and collates them into one batch, which is a loader worker's whole job: the
tutorial's torchvision pipeline returns normalised float crops; ours
(:class:`dino_nb.augment.DataAugmentation`) returns uint8 crops, normalised after
collation by the training loop on its device (the script prints what that costs when the
device is this CPU). Passes alternate between the contenders, on the same images; the
table shows median images/s and the median of the per-pair time ratios.

Read from ``../shared/data/imagenette-mini`` (224x224 photos) when present; ``--photos
500x375`` uses generated JPEGs of ImageNette's typical full size instead, where more crop
boxes are larger than the output and our gain is smaller.

Rows:

- the tutorial's settings, ``-c 4``: 2 global + 2 local crops, all at 224;
- 2 global + 8 local at 224 (the tutorial's ``DataAugmentation`` default);
- the same with our colour jitter applied as often as the tutorial's (p=0.5 instead of
  the paper's 0.8), to show how much of the gap is the extra work the paper asks for;
- the paper's settings: 8 local crops at 96 (both pipelines at the same settings);
- the CPU side of ``--gpu-augment`` (decode + resize to a 256 canvas; crops and colour
  work move to the GPU), against the tutorial's pipeline at the paper's settings.
  ``--device cuda`` adds the device side of that path.

Usage:
    python benchmarks/bench_augment.py            # about 2 minutes on 2 cores
    python benchmarks/bench_augment.py --quick    # a sanity run, seconds
    python benchmarks/bench_augment.py --photos 500x375   # larger (generated) photos
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import _common as C
import seed_baseline
import torch

import dino_nb.augment as augment
from dino_nb.augment import DataAugmentation, normalize_uint8
from dino_nb.datasets import rgb_loader
from dino_nb.fast.crops import DecodeResize, GPUMultiCrop
from dino_nb.loader import collate_crops


@contextlib.contextmanager
def jitter_probability(p: float):
    """Temporarily change the colour-jitter probability of ``dino_nb.augment``."""
    old = augment.P_JITTER
    augment.P_JITTER = p
    try:
        yield
    finally:
        augment.P_JITTER = old


def make_pass(paths, n_images, transform, collate):
    """A function that loads, augments and collates ``n_images`` (cycling over ``paths``)."""
    it = itertools.cycle(paths)

    def run():
        batch = [(transform(rgb_loader(next(it))), 0) for _ in range(n_images)]
        crops, _ = collate(batch)
        return crops

    return run


def baseline_collate(batch):
    """``default_collate`` for a list of crops: one stacked tensor per crop."""
    return [torch.stack([s[0][i] for s in batch]) for i in range(len(batch[0][0]))], None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sanity run")
    p.add_argument("--images", type=int, default=24, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=9, help="timed passes per contender")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one loader worker)")
    p.add_argument("--canvas", type=int, default=256, help="canvas of the --gpu-augment path")
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
    p.add_argument(
        "--batch", type=int, default=64, help="batch for the device side of the GPU path"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 4, 1
    threads = C.set_threads(args.threads)
    if args.photos:
        try:
            w, h = (int(v) for v in args.photos.lower().split("x"))
        except ValueError:
            p.error(f"--photos must look like 500x375, got {args.photos!r}")
        root, source = C.image_folder_root(size=(w, h), generated=True)
    else:
        root, source = C.image_folder_root()
    paths = C.jpeg_paths(root)
    print(
        f"images: {source}; {args.images} images per pass, {args.repeats} passes; {C.machine_line(threads)}"
    )

    settings = [
        ("tutorial -c 4: 2+2 crops at 224", dict(n_local_crops=2, global_size=224), None),
        ("2+8 crops at 224", dict(n_local_crops=8, global_size=224), None),
        ("2+8 at 224, ours with jitter p=0.5", dict(n_local_crops=8, global_size=224), 0.5),
        ("paper: 2x224 + 8x96", dict(n_local_crops=8, global_size=224, local_size=96), None),
    ]
    rows = []
    for name, kw, p_jitter in settings:
        # the tutorial calls the global crops' side ``size``
        base = seed_baseline.DataAugmentation(
            **{"size" if k == "global_size" else k: v for k, v in kw.items()}
        )
        ours = DataAugmentation(**kw, normalize=False)
        fns = {
            "baseline": make_pass(paths, args.images, base, baseline_collate),
            "ours": make_pass(paths, args.images, ours, collate_crops),
        }
        with jitter_probability(p_jitter if p_jitter is not None else augment.P_JITTER):
            for fn in fns.values():  # warm-up: file cache, lazy imports
                fn()
            t = C.alternate(fns, args.repeats)
        b, o = args.images / C.median(t["baseline"]), args.images / C.median(t["ours"])
        rows.append([name, b, o, C.paired_ratio(t["baseline"], t["ours"])])
        print(f"  {name}: {b:.1f} vs {o:.1f} images/s", flush=True)
        if "local_size" in kw:
            crops = fns["ours"]()
            t_norm = C.alternate(
                {"norm": lambda crops=crops: [normalize_uint8(c) for c in crops]}, 3
            )
            norm_ms = 1e3 * C.median(t_norm["norm"]) / args.images

    # --gpu-augment: the CPU only decodes and resizes; the baseline is the tutorial at the paper's settings
    decode = DecodeResize(args.canvas)
    it = itertools.cycle(paths)

    def cpu_side():
        return torch.stack([decode(decode.open(next(it))) for _ in range(args.images)])

    base = make_pass(
        paths,
        args.images,
        seed_baseline.DataAugmentation(n_local_crops=8, local_size=96),
        baseline_collate,
    )
    cpu_side(), base()
    t = C.alternate({"baseline": base, "ours": cpu_side}, args.repeats)
    b, o = args.images / C.median(t["baseline"]), args.images / C.median(t["ours"])
    rows.append(
        [
            f"paper settings, --gpu-augment CPU side (decode + resize to {args.canvas})",
            b,
            o,
            C.paired_ratio(t["baseline"], t["ours"]),
        ]
    )

    C.print_table(
        f"Multi-crop augmentation, images/s in one worker ({threads} torch thread), median of {args.repeats}",
        ["setting", "tutorial", "ours", "ratio"],
        rows,
    )
    print(
        f"\nOurs normalises the collated uint8 crops on the training device; on this CPU that costs "
        f"{norm_ms:.2f} ms per image at the paper's settings (normalize_uint8, outside the worker)."
    )

    if args.device:
        device = torch.device(args.device)
        gpu_aug = GPUMultiCrop(n_local_crops=8, global_size=224, local_size=96)
        canvases = cpu_side()[: min(args.images, args.batch)]
        canvases = canvases.repeat((args.batch + len(canvases) - 1) // len(canvases), 1, 1, 1)[
            : args.batch
        ]
        canvases = canvases.to(device)
        gpu_aug(canvases)  # warm-up
        t = C.alternate(
            {"gpu": lambda: gpu_aug(canvases)}, max(args.repeats, 3), device=str(device)
        )
        rate = args.batch / C.median(t["gpu"])
        C.print_table(
            f"GPUMultiCrop on {device}, paper settings, batch {args.batch} canvases of {args.canvas}",
            ["device", "images/s", "ms per batch"],
            [[str(device), rate, 1e3 * C.median(t["gpu"])]],
        )


if __name__ == "__main__":
    main()
