"""Cost of one kNN evaluation during training: the tutorial's vs ours.

The tutorial (``seed_baseline.compute_knn``) embeds the whole training set and the whole
validation set at every evaluation, with autograd recording (no ``no_grad``), batches of
64, its plain transform (normalise, then resize the float tensor to 224x224), and fits
sklearn's kNN. Ours does what ``dino_nb.loop``'s evaluator does: a fixed random subset of
at most ``eval_train_subset`` training images as the memory bank, the whole validation
set, ``extract_features`` (inference mode) under autocast, batches of 128, the paper's
weighted kNN plus the sklearn score on the same features.

Dataset sizes are ImageNette's (9469 train, 3925 val images; ``eval_train_subset`` 5000)
times ``--scale``, cycling over the available JPEGs, so the proportions are the real ones
while the run stays short. Both evaluators read and decode the JPEGs in the main process.
Timed evaluations alternate; the table shows medians.

Usage:
    python benchmarks/bench_eval.py            # scale 0.03: about 2 minutes on 2 cores
    python benchmarks/bench_eval.py --quick
"""

from __future__ import annotations

import argparse
import contextlib

import _common as C
import seed_baseline
import timm
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from dino_nb.datasets import plain_transform, rgb_loader
from dino_nb.distributed import native_bf16
from dino_nb.evaluation import extract_features, sklearn_knn_topk, weighted_knn
from dino_nb.model import build_backbone

IMAGENETTE_TRAIN, IMAGENETTE_VAL, EVAL_TRAIN_SUBSET = 9469, 3925, 5000


def cycled(dataset, n):
    """The first ``n`` items of ``dataset`` repeated end to end."""
    return Subset(dataset, [i % len(dataset) for i in range(n)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sanity run")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--scale", type=float, default=0.03, help="fraction of ImageNette's sizes")
    p.add_argument(
        "--subset", type=int, default=EVAL_TRAIN_SUBSET, help="eval_train_subset before scaling"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on an idle 2-core machine)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    if args.quick:
        args.scale, args.repeats = 0.004, 1
    threads = C.set_threads(args.threads)
    device = torch.device(args.device)
    root, source = C.image_folder_root()
    n_train, n_val = round(IMAGENETTE_TRAIN * args.scale), round(IMAGENETTE_VAL * args.scale)
    n_subset = min(round(args.subset * args.scale), n_train)
    print(
        f"images: {source}; train {n_train}, val {n_val}, our memory bank {n_subset}; {C.machine_line(threads)}",
        flush=True,
    )

    # the tutorial: whole train and val sets, its transform, batch 64
    t_train = cycled(
        ImageFolder(str(root / "train"), seed_baseline.plain_transform(), loader=rgb_loader),
        n_train,
    )
    t_val = cycled(
        ImageFolder(str(root / "val"), seed_baseline.plain_transform(), loader=rgb_loader), n_val
    )
    t_loaders = DataLoader(t_train, batch_size=64), DataLoader(t_val, batch_size=64)
    torch.manual_seed(0)
    tutorial_vit = timm.create_model(args.model, pretrained=False)
    tutorial_vit.head = torch.nn.Identity()
    tutorial_vit.to(device).eval()

    # ours: a fixed subset of the train set (drawn once, as the training loop does), batch 128
    o_train_full = cycled(
        ImageFolder(str(root / "train"), plain_transform(224), loader=rgb_loader), n_train
    )
    g = torch.Generator().manual_seed(0)
    subset = torch.randperm(n_train, generator=g)[:n_subset].sort().values.tolist()
    o_loaders = (
        DataLoader(Subset(o_train_full, subset), batch_size=128),
        DataLoader(
            cycled(ImageFolder(str(root / "val"), plain_transform(224), loader=rgb_loader), n_val),
            batch_size=128,
        ),
    )
    ours_vit = build_backbone(args.model).to(device).eval()
    # bf16 where the device has it natively (the CPU, CUDA 8.0+), fp16 on a T4 or V100, whose
    # bf16 is emulated (torch.cuda.is_bf16_supported() says yes there all the same)
    amp = torch.bfloat16 if native_bf16(device) else torch.float16

    def tutorial():
        return seed_baseline.compute_knn(tutorial_vit, *t_loaders)

    def ours(precision):
        def run():
            ctx = (
                torch.autocast(device.type, dtype=amp)
                if precision != "fp32"
                else contextlib.nullcontext()
            )
            with ctx:
                x_train, y_train = extract_features(ours_vit, o_loaders[0])
                x_val, y_val = extract_features(ours_vit, o_loaders[1])
            top1, _ = weighted_knn(x_train, y_train, x_val, y_val, k=20, temperature=0.07)
            return top1, sklearn_knn_topk(x_train, y_train, x_val, y_val)[0]

        return run

    fns = {"tutorial": tutorial, "ours-bf16": ours("bf16"), "ours-fp32": ours("fp32")}
    times = C.alternate(fns, args.repeats, device=args.device)
    base = C.median(times["tutorial"])
    images = {
        "tutorial": n_train + n_val,
        "ours-bf16": n_subset + n_val,
        "ours-fp32": n_subset + n_val,
    }
    rows = [
        [
            k,
            str(amp).replace("torch.", "") if k == "ours-bf16" else "fp32",
            images[k],
            C.median(t),
            base / C.median(t),
        ]
        for k, t in times.items()
    ]
    C.print_table(
        f"One kNN evaluation on {args.device} ({args.model}), seconds, median of {args.repeats}",
        ["evaluator", "precision", "images embedded", "seconds", "ratio"],
        rows,
    )
    full = (IMAGENETTE_TRAIN + IMAGENETTE_VAL) / (n_train + n_val)
    print(
        f"At ImageNette's full size: tutorial ~{base * full:.0f} s per evaluation, ours "
        f"~{C.median(times['ours-bf16']) * full:.0f} s (bf16); the tutorial evaluates every 200 steps, "
        "dino_nb.loop every eval_every=1000."
    )


if __name__ == "__main__":
    main()
