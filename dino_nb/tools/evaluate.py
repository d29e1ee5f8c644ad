"""``python -m dino_nb.evaluate``: a checkpoint's features judged as the paper does, with figures.

Weighted kNN at the paper's k values, the tutorial's sklearn kNN, a linear probe, and optional
figures (confusion matrix, embedding map, nearest neighbours, attention maps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..augment import denormalize
from ..evaluation import (
    PAPER_KS,
    extract_features,
    knn_sweep,
    linear_probe,
    nearest_neighbours,
    weighted_knn_votes,
)
from ..loader import make_loader


class _Images:
    """Lazy ``[0, 1]`` images of a dataset of normalised tensors, indexable like a list."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return denormalize(self.dataset[int(i)][0])  # (3, H, W)


def _pick_queries(labels: torch.Tensor, n: int) -> list[int]:
    """The first sample of each class, then more in order, up to ``n`` indices."""
    firsts = [int((labels == c).nonzero()[0]) for c in torch.unique(labels)]
    rest = [i for i in range(len(labels)) if i not in set(firsts)]
    return (firsts + rest)[:n]


def _format_table(results: dict[str, float], ks: Sequence[int], probe: float | None) -> str:
    lines = [f"{'metric':<24}{'k':>5}{'top-1':>9}{'top-5':>9}", "-" * 47]
    for name, label in (
        ("sklearn", "sklearn kNN (tutorial)"),
        ("weighted", "weighted kNN (paper)"),
    ):
        for k in ks:
            t1, t5 = results[f"{name}_k{k}_top1"], results[f"{name}_k{k}_top5"]
            lines.append(f"{label:<24}{k:>5}{100 * t1:>8.1f}%{100 * t5:>8.1f}%")
    if probe is not None:
        lines.append(f"{'linear probe':<24}{'-':>5}{100 * probe:>8.1f}%{'-':>9}")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dino_nb.evaluate",
        description="Evaluate a DINO checkpoint: kNN both ways, linear probe, and figures "
        "(embedding map, nearest neighbours, confusion matrix, self-attention maps).",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint.pth or best_model.pth of a training run"
    )
    p.add_argument(
        "--data", default="builtin", help="folder with train/ and val/, or 'builtin' (default)"
    )
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="which backbone (the paper uses the teacher)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for the figures and metrics.json (default: <checkpoint folder>/eval)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader workers"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available",
    )
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=list(PAPER_KS),
        help="neighbour counts of the kNN sweep",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="cache the training features in <out>/train_features.pt",
    )
    p.add_argument("--no-figures", action="store_true", help="print the table only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dino_nb.evaluate``; returns the exit code."""
    args = _parse_args(argv)
    from ..checkpoint import load
    from ..datasets import build_datasets, plain_transform
    from ..distributed import pick_device
    from ..model import backbone_from_checkpoint, is_vit

    # set-up: every problem with the inputs is one clean line and exit code 2
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = pick_device(args.device)
        ckpt_path = Path(args.checkpoint)
        ckpt = load(ckpt_path)
        if "config" not in ckpt or args.which not in ckpt:
            raise ValueError(
                f"{ckpt_path} is not a dino_nb training checkpoint (needs 'config' and '{args.which}')"
            )
        config, step = ckpt["config"], ckpt.get("step")
        del ckpt
        size = int(config.get("global_size") or 224)
        backbone = backbone_from_checkpoint(str(ckpt_path), args.which).to(device)
        bundle = build_datasets(args.data, plain_transform(size), size)
        if not bundle.labelled:
            raise ValueError(
                f"{bundle.root} has no train/ and val/ class folders, so there is nothing to "
                "classify; embed and search it with `python -m dino_nb.embed`"
            )
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else ckpt_path.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    train_loader = make_loader(
        bundle.train_plain,
        args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    val_loader = make_loader(
        bundle.val_plain,
        args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    stat = ckpt_path.stat()
    key = f"{ckpt_path.resolve()}|{args.which}|step={step}|mtime_ns={stat.st_mtime_ns}|bytes={stat.st_size}|size={size}"
    train_f, train_y = extract_features(
        backbone,
        train_loader,
        cache_path=out / "train_features.pt" if args.cache else None,
        cache_key=key,
    )
    val_f, val_y = extract_features(backbone, val_loader)
    n_classes = len(bundle.classes)

    results = knn_sweep(train_f, train_y, val_f, val_y, ks=args.ks, num_classes=n_classes)
    probe = linear_probe(train_f, train_y, val_f, val_y) if len(torch.unique(train_y)) > 1 else None
    print(f"checkpoint {ckpt_path} ({args.which}, step {step}), data {bundle.root}, {device}")
    print(
        f"features: train {tuple(train_f.shape)}, val {tuple(val_f.shape)}, {n_classes} classes, {size}px"
    )
    print(_format_table(results, args.ks, probe))
    metrics = {
        "checkpoint": str(ckpt_path),
        "which": args.which,
        "step": step,
        **results,
        "linear_probe_top1": probe,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    if not args.no_figures:
        _write_figures(out, backbone, bundle, train_f, train_y, val_f, val_y, is_vit(backbone))
        print(f"figures and metrics.json written to {out}")
    else:
        print(f"metrics.json written to {out}")
    return 0


def _write_figures(
    out: Path,
    backbone: nn.Module,
    bundle: object,
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    vit: bool,
) -> None:
    """Embedding maps, neighbours, confusion matrix and attention grids as PNGs in ``out``."""
    from ..datasets import class_names
    from ..notebook import figures as viz
    from ..notebook.attention import cls_attention_maps, embeds_class_token

    classes = class_names(bundle.classes)  # type: ignore[attr-defined]  # ImageNette ids -> "tench", ...
    val_images = _Images(bundle.val_plain)  # type: ignore[attr-defined]
    train_images = _Images(bundle.train_plain)  # type: ignore[attr-defined]

    def save(fig: object, name: str) -> None:
        fig.savefig(out / name, dpi=100)  # type: ignore[attr-defined]

    # the maps show at most 1000 validation points (t-SNE is slow), 60 with thumbnails
    sub = torch.linspace(0, len(val_f) - 1, min(len(val_f), 1000)).round().long().unique()
    thumb_pos = torch.linspace(0, len(sub) - 1, min(len(sub), 60)).round().long().unique().tolist()
    thumbs = {pos: val_images[int(sub[pos])] for pos in thumb_pos}  # position in sub -> image
    for method in ("pca", "tsne"):
        fig = viz.embedding_map(
            val_f[sub], val_y[sub], class_names=classes, images=thumbs, method=method
        )
        save(fig, f"embedding_{method}.png")

    queries = _pick_queries(val_y, 6)
    sims, idx = nearest_neighbours(train_f, val_f[queries], k=5)  # (n_queries, k)
    fig = viz.neighbours_grid(
        [val_images[q] for q in queries],
        val_y[queries],
        train_images,
        train_y,
        sims,
        idx,
        class_names=classes,
    )
    save(fig, "neighbours.png")

    votes = weighted_knn_votes(train_f, train_y, val_f, k=20, num_classes=len(classes))
    fig = viz.confusion_matrix_figure(val_y, votes.argmax(dim=1), classes)
    save(fig, "confusion_matrix.png")

    if vit and not embeds_class_token(backbone):
        print("no attention maps: this backbone's embedding is not its [CLS] token")
    elif vit:
        for n, q in enumerate(queries[:4]):
            image = bundle.val_plain[q][0]  # type: ignore[attr-defined]
            maps = cls_attention_maps(backbone, image[None])[0]  # (n_heads, grid_h, grid_w)
            fig = viz.attention_grid(denormalize(image), maps, title=classes[int(val_y[q])])
            save(fig, f"attention_{n}.png")


if __name__ == "__main__":
    sys.exit(main())
