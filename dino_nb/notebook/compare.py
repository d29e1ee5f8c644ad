"""Before and after DINO, side by side: the same images through the random and the trained network.

Notebook 05 judges a run by what changed: the network as ``train()`` built it (seeded by the
run's ``cfg.seed``, before its first step) against the teacher it ended with. Every figure
here takes a mapping ``{name: result}`` (``"random init"``, ``"after DINO"``) and draws the
results in one figure, panel beside panel, so the eye compares the same queries and images.

The same functions serve the built-in shapes and the ImageNette photos of a documented run
(:func:`photo_checkpoint`, :data:`PHOTO_COMMAND`, :func:`run_data`); a test runs them on the built-in data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..checkpoint import load
from ..config import TrainConfig
from ..model import backbone_from_checkpoint, student_teacher_from_config
from ..sources import BUILTIN, IMAGENETTE, find_imagenette, resolve_data_root
from ..step import seed_everything
from .attention import upsample
from .explore import _checkout_root, runs_dir
from .figures import class_colors, draw_embedding, new_figure, project_2d, to_hwc

#: The two networks every comparison shows, in order.
RANDOM, TRAINED = "random init", "after DINO"
#: The photo preset whose [CLS] token is the embedding, so that its attention maps mean something.
PHOTO_PRESET = "cpu-photos-cls"
#: Where notebook 05 looks for the photo run (under the notebooks' runs folder).
PHOTO_RUN = "photos-cls"
#: The command that makes the photo run, from the top of the repository (add ``--data PATH``
#: when ImageNette is not where the search looks). 10 epochs, no time budget: the same
#: steps on any machine (2,660 of 32 photos on ImageNette's 8,529-photo train folder).
PHOTO_COMMAND = (
    f"python -m dino_nb.train --preset {PHOTO_PRESET} --minutes none --out runs/{PHOTO_RUN}"
)


@dataclass
class NetworkPair:
    """A run's teacher backbone after training and the same network at initialisation.

    Attributes:
        cfg: the run's configuration (from the checkpoint).
        steps: the steps the checkpoint was trained for.
        networks: ``{RANDOM: backbone, TRAINED: backbone}``, in eval mode on the device.
    """

    cfg: TrainConfig
    steps: int
    networks: dict[str, nn.Module]


def network_pair(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> NetworkPair:
    """Load a run's teacher backbone and rebuild the network it started from.

    ``train()`` seeds with ``cfg.seed`` and then builds student and teacher, so seeding the
    same way and building again gives the very weights of step 0 (the teacher starts as a
    copy of the student).

    Args:
        checkpoint: a ``checkpoint.pth`` written by :func:`dino_nb.loop.train`.
        device: where the backbones go.
    """
    state = load(checkpoint)
    cfg = TrainConfig.from_dict(state["config"])
    trained = backbone_from_checkpoint(str(checkpoint), which="teacher")
    seed_everything(cfg.seed)
    _, initial = student_teacher_from_config(cfg)
    networks = {RANDOM: initial.backbone.eval().to(device), TRAINED: trained.to(device)}
    return NetworkPair(cfg, int(state["step"]), networks)


def photo_checkpoint(run: str | os.PathLike | None = None) -> Path | None:
    """The photo run's ``checkpoint.pth`` (:data:`PHOTO_COMMAND`), or ``None`` when it is absent."""
    path = Path(run) if run is not None else runs_dir(PHOTO_RUN)
    path = path / "checkpoint.pth"
    return path if path.is_file() else None


def run_data(cfg: TrainConfig) -> Path:
    """The folder a run trained on, found again from a notebook.

    A relative ``--data`` path is tried as it is, then from the top of the repository, where
    :data:`PHOTO_COMMAND` runs (the notebooks run one folder below it); ``"imagenette"`` (or
    a folder that is gone) searches for ImageNette; ``"builtin"`` is the built-in dataset.

    Raises:
        FileNotFoundError: ImageNette is not found (the message says how to get it).
    """
    if cfg.data in (None, BUILTIN):
        return resolve_data_root(cfg.data)
    if cfg.data != IMAGENETTE:
        path = Path(cfg.data).expanduser()
        root = _checkout_root()
        for candidate in (path, root / path if root is not None else path):
            if candidate.is_dir():
                return resolve_data_root(candidate.resolve())
    return find_imagenette()


def same_class_share(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 5,
) -> float:
    """Fraction of the ``k`` most cosine-similar bank images that share their query's class.

    Args:
        bank: ``(n_bank, dim)`` features.
        bank_labels: ``(n_bank,)``.
        query: ``(n_query, dim)`` features.
        query_labels: ``(n_query,)``.
        k: neighbours per query.
    """
    from ..evaluation import nearest_neighbours

    _, top = nearest_neighbours(bank, query, k=k)  # (n_query, k) indices into the bank
    return float((bank_labels[top] == query_labels[:, None]).float().mean())


# --------------------------------------------------------------------------- figures


def maps_side_by_side(
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor | Sequence[int],
    class_names: Sequence[str],
    images: Sequence | None = None,
    method: str = "tsne",
    n_thumbnails: int = 30,
    title: str | None = None,
) -> Figure:
    """One 2-D embedding map per network, side by side, coloured by the (unused) labels.

    Args:
        features: ``{name: (n_samples, dim)}``, the same samples for every network.
        labels: ``(n_samples,)`` classes.
        class_names: names for the legend.
        images: one thumbnail per sample (``(3, H, W)`` in [0, 1]); ``n_thumbnails`` of them,
            evenly spaced, are drawn on each map.
        n_thumbnails: how many thumbnails per map.
        method: ``"tsne"`` or ``"pca"``.
        title: a line above the panels.
    """
    y = np.asarray(torch.as_tensor(labels).cpu()).astype(int)
    colors = class_colors(len(class_names))
    fig = new_figure((4.4 * len(features) + 1.6, 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(features)))
    for ax, (name, x) in zip(axes, features.items(), strict=True):
        xy = project_2d(x, method)  # (n_samples, 2)
        draw_embedding(ax, xy, y, colors, class_names, images, n_thumbnails)
        ax.set_title(name)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, markerscale=1.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    return fig


def neighbours_side_by_side(
    query_images: Sequence,
    query_labels: Sequence[int],
    gallery: Sequence,
    gallery_labels: torch.Tensor,
    neighbours: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
) -> Figure:
    """Each query (a row) beside its nearest training images under each network.

    A neighbour's class is written green when it matches the query's, red otherwise.

    Args:
        query_images: ``n_query`` images in [0, 1].
        query_labels: ``n_query`` classes.
        gallery: indexable by the neighbour indices, each item an image in [0, 1].
        gallery_labels: ``(n_gallery,)``.
        neighbours: ``{name: (n_query, k) indices into the gallery}``.
        class_names: class names.
    """
    n_query, k = next(iter(neighbours.values())).shape
    groups = len(neighbours)
    # the query, then k columns per network, a narrow gap before each network
    widths = [1.0] + ([0.25] + [1.0] * k) * groups
    fig = new_figure((sum(widths) + 0.2, 1.3 * n_query + 0.55))
    axes = fig.subplots(n_query, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})
    for r in range(n_query):
        query_class = int(query_labels[r])
        axes[r, 0].imshow(to_hwc(query_images[r]))
        axes[r, 0].set_title(class_names[query_class], fontsize=7, fontweight="bold")
        for g, idx in enumerate(neighbours.values()):
            for c in range(k):
                label = int(gallery_labels[int(idx[r, c])])
                ax = axes[r, 2 + g * (k + 1) + c]
                ax.imshow(to_hwc(gallery[int(idx[r, c])]))
                color = "tab:green" if label == query_class else "tab:red"
                ax.set_title(class_names[label], fontsize=7, color=color)
    for ax in axes.flat:
        ax.axis("off")
    top = 1 - 0.5 / fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.3)
    for g, name in enumerate(neighbours):  # a header over each network's columns
        left = axes[0, 2 + g * (k + 1)].get_position().x0
        fig.text(
            left,
            1 - 0.15 / fig.get_figheight(),
            f"{name}: the {k} nearest training images",
            fontsize=9,
            fontweight="bold",
            va="center",
        )
    return fig


def attention_side_by_side(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    titles: Sequence[str],
) -> Figure:
    """Each image and its ``[CLS]`` attention per head, one row per network.

    The maps are drawn as they are (upsampled to the image, each head scaled to its own
    maximum), not over the image: where a head looks is easier to read on its own.

    Args:
        images: ``(n_images, 3, H, W)`` in [0, 1].
        maps: ``{name: (n_images, n_heads, grid_h, grid_w)}`` from
            :func:`~dino_nb.notebook.attention.cls_attention_maps`.
        titles: one per image (e.g. its class).
    """
    n_images = images.shape[0]
    n_heads = next(iter(maps.values())).shape[1]
    rows = n_images * len(maps)
    fig = new_figure((1.45 * (n_heads + 1) + 0.6, 1.45 * rows + 0.3))
    axes = fig.subplots(rows, n_heads + 1, squeeze=False)
    size = tuple(images.shape[-2:])
    for i in range(n_images):
        img = to_hwc(images[i])
        for g, (name, m) in enumerate(maps.items()):
            row = axes[i * len(maps) + g]
            row[0].imshow(img)
            row[0].set_title(f"{titles[i]}: {name}", fontsize=7, loc="left")
            up = upsample(m[i].float(), size, "nearest")  # (n_heads, H, W)
            for h in range(n_heads):
                row[h + 1].imshow(up[h].numpy(), cmap="inferno")
                if i == 0 and g == 0:
                    row[h + 1].set_title(f"head {h}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig
