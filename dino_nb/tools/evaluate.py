"""``python -m dino_nb.evaluate``: a checkpoint's features judged as the paper does, with figures.

Weighted kNN at the paper's k values, the tutorial's sklearn kNN, a linear probe, and optional
figures (confusion matrix, embedding map, nearest neighbours, attention maps).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..augment import denormalize
from ..checkpoint import load, save_atomic
from ..evaluation import (
    PAPER_KS,
    _check_pair,
    extract_features,
    linear_probe,
    nearest_neighbours,
    sklearn_knn_topk,
    weighted_knn,
    weighted_knn_votes,
)
from ..loader import make_loader
from .cli import option, run_program


def knn_sweep(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    ks: Sequence[int] = PAPER_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Both kNN classifiers on the same features at each ``k``, top-1 and top-5.

    Args:
        train_features: ``(n_train, dim)``.
        train_labels: ``(n_train,)``.
        val_features: ``(n_val, dim)``.
        val_labels: ``(n_val,)``.
        ks: neighbour counts; each is capped at ``n_train`` (the key keeps the asked ``k``).
        temperature: of the weighted kNN.
        num_classes: number of classes; default ``max(label) + 1``.

    Returns:
        ``{"sklearn_k{k}_top1", "sklearn_k{k}_top5", "weighted_k{k}_top1",
        "weighted_k{k}_top5"}`` for every ``k``, fractions in [0, 1].
    """
    _check_pair(train_features, train_labels, "train")
    _check_pair(val_features, val_labels, "val")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive neighbour counts, got {tuple(ks)}")
    results: dict[str, float] = {}
    for k in ks:
        s1, s5 = sklearn_knn_topk(train_features, train_labels, val_features, val_labels, k)
        w1, w5 = weighted_knn(
            train_features, train_labels, val_features, val_labels, k, temperature, num_classes
        )
        results.update(
            {
                f"sklearn_k{k}_top1": s1,
                f"sklearn_k{k}_top5": s5,
                f"weighted_k{k}_top1": w1,
                f"weighted_k{k}_top5": w5,
            }
        )
    return results


def _dataset_fingerprint(data_loader: DataLoader) -> str:
    """Size and (where known) file list of a loader's dataset, so a cache notices a new dataset."""
    dataset = data_loader.dataset
    h = hashlib.sha1(str(len(dataset)).encode())  # type: ignore[arg-type]
    for path, label in getattr(dataset, "samples", []):
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()


def cached_features(
    backbone: nn.Module, data_loader: DataLoader, cache_path: str | os.PathLike, cache_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~dino_nb.evaluation.extract_features`, kept on disk for the next evaluation.

    The training set is the expensive part of an evaluation. The cache is only as right as its
    key: ``cache_key`` must change whenever the weights change (e.g. ``f"teacher-step{step}"``).
    A file whose key, or whose dataset (size and file list), differs is recomputed and
    overwritten.
    """
    if not cache_key:
        raise ValueError("cached_features needs a cache_key that changes with the weights")
    fingerprint = _dataset_fingerprint(data_loader)
    if Path(cache_path).is_file():
        try:
            cached = load(cache_path)
        except RuntimeError:  # unreadable leftover: recompute and overwrite
            cached = {}
        if cached.get("key") == cache_key and cached.get("dataset") == fingerprint:
            return cached["features"], cached["labels"]
    features, labels = extract_features(backbone, data_loader)
    record = {"key": cache_key, "dataset": fingerprint, "features": features, "labels": labels}
    save_atomic(record, cache_path)
    return features, labels


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


@dataclass(kw_only=True)
class EvaluateOptions:
    """The options of ``python -m dino_nb.evaluate``."""

    checkpoint: str = option(help="checkpoint.pth or best_model.pth of a training run")
    data: str = option("builtin", "folder with train/ and val/, or 'builtin'")
    which: Literal["teacher", "student"] = option(
        "teacher", "which backbone (the paper uses the teacher)"
    )
    out: str | None = option(
        None, "folder for the figures and metrics.json (none: <checkpoint folder>/eval)"
    )
    batch_size: int = option(256, "images per forward pass", min=1)
    num_workers: int = option(min(4, os.cpu_count() or 1), "data loader workers", min=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: CUDA when available")
    ks: tuple[int, ...] = option(PAPER_KS, "neighbour counts of the kNN sweep", min=1)
    cache: bool = option(False, "cache the training features in <out>/train_features.pt")
    figures: bool = option(True, "write the figures (--no-figures: print the table only)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dino_nb.evaluate``; returns the exit code."""
    return run_program(
        _evaluate,
        EvaluateOptions,
        argv,
        prog="python -m dino_nb.evaluate",
        description="Evaluate a DINO checkpoint: kNN both ways, linear probe, and figures "
        "(embedding map, nearest neighbours, confusion matrix, self-attention maps).",
    )


def _load(opts: EvaluateOptions, device: torch.device) -> tuple[nn.Module, Any, int | None, int]:
    """The checkpoint's backbone on ``device``, the labelled datasets, its step and image size."""
    from ..datasets import build_datasets, plain_transform
    from ..model import backbone_from_checkpoint

    ckpt = load(opts.checkpoint)
    if "config" not in ckpt or opts.which not in ckpt:
        raise ValueError(
            f"{opts.checkpoint} is not a dino_nb training checkpoint (needs 'config' and '{opts.which}')"
        )
    config, step = ckpt["config"], ckpt.get("step")
    del ckpt
    size = int(config.get("global_size") or 224)
    backbone = backbone_from_checkpoint(opts.checkpoint, opts.which).to(device)
    bundle = build_datasets(opts.data, plain_transform(size), size)
    if not bundle.labelled:
        raise ValueError(
            f"{bundle.root} has no train/ and val/ class folders, so there is nothing to "
            "classify; embed and search it with `python -m dino_nb.embed`"
        )
    return backbone, bundle, step, size


def _evaluate(opts: EvaluateOptions) -> int:
    from ..distributed import pick_device
    from ..model import is_vit

    device = pick_device(opts.device)
    backbone, bundle, step, size = _load(opts, device)
    ckpt_path = Path(opts.checkpoint)
    out = Path(opts.out) if opts.out else ckpt_path.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    train_loader, val_loader = (
        make_loader(
            d, opts.batch_size, num_workers=opts.num_workers, pin_memory=device.type == "cuda"
        )
        for d in (bundle.train_plain, bundle.val_plain)
    )
    stat = ckpt_path.stat()
    key = f"{ckpt_path.resolve()}|{opts.which}|step={step}|mtime_ns={stat.st_mtime_ns}|bytes={stat.st_size}|size={size}"
    if opts.cache:
        train_f, train_y = cached_features(backbone, train_loader, out / "train_features.pt", key)
    else:
        train_f, train_y = extract_features(backbone, train_loader)
    val_f, val_y = extract_features(backbone, val_loader)
    n_classes = len(bundle.classes)

    results = knn_sweep(train_f, train_y, val_f, val_y, ks=opts.ks, num_classes=n_classes)
    probe = linear_probe(train_f, train_y, val_f, val_y) if len(torch.unique(train_y)) > 1 else None
    print(f"checkpoint {ckpt_path} ({opts.which}, step {step}), data {bundle.root}, {device}")
    print(
        f"features: train {tuple(train_f.shape)}, val {tuple(val_f.shape)}, {n_classes} classes, {size}px"
    )
    print(_format_table(results, opts.ks, probe))
    metrics = {
        "checkpoint": str(ckpt_path),
        "which": opts.which,
        "step": step,
        **results,
        "linear_probe_top1": probe,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    if opts.figures:
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
    from ..notebook import figures as viz
    from ..notebook.attention import cls_attention_maps, embeds_class_token
    from ..sources import class_names

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
