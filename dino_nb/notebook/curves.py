"""A run's curves from its ``metrics.jsonl`` and the schedules of whole runs, as figures (notebook 04)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..step import Schedules
from .figures import new_figure

#: Panels of :func:`training_curves`, in order: (metrics.jsonl key, axis title).
CURVES = (
    ("loss", "DINO loss"),
    ("lr", "learning rate"),
    ("wd", "weight decay"),
    ("momentum", "teacher momentum"),
    ("teacher_temp", "teacher temperature"),
    ("teacher_entropy", "teacher entropy (nats)"),
    ("batch_entropy", "batch-mean entropy (nats)"),
    ("knn_top1", "kNN top-1"),
)


def read_metrics(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a file, a run folder holding one, or records already read).

    Unparsable lines (e.g. a line cut short by a crash) are skipped.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"metrics file not found: {path}")
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records
    return [dict(r) for r in source]


def training_curves(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> Figure:
    """Training curves from ``metrics.jsonl``: loss, schedules and kNN top-1 against the step.

    A panel is drawn for each of :data:`CURVES` present in at least one record; records
    without a key are skipped for that panel (kNN is logged on evaluation steps only).

    Args:
        source: path of ``metrics.jsonl``, a run folder, or a list of dicts.

    Returns:
        a figure with one axis per present metric (one axis saying so when none is).
    """
    records = read_metrics(source)
    present = [(key, name) for key, name in CURVES if any(_is_number(r.get(key)) for r in records)]
    if not present:
        fig = new_figure((4, 3))
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
        ax.axis("off")
        return fig
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = new_figure((4.2 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, (key, name) in zip(axes, present, strict=False):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(records) if _is_number(r.get(key))]
        steps, values = zip(*pts, strict=True)
        ax.plot(steps, values, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "knn_top1":
            ax.set_ylim(0, 1)
    for ax in axes[len(present) :]:
        fig.delaxes(ax)
    fig.tight_layout()
    return fig


def schedules_figure(runs: Mapping[str, Schedules]) -> Figure:
    """Every schedule of one or more runs over the fraction of the run: lr, wd, momentum, temperature.

    The x-axis is the fraction of the run, so a 372-step CPU recipe and a 14,700-step paper
    recipe compare shape for shape (and a time budget only changes the step count).

    Args:
        runs: ``{label: Schedules}``, e.g. one per preset.
    """
    if not runs:
        raise ValueError("schedules_figure needs at least one run")
    panels = (
        ("lr", "learning rate"),
        ("weight_decay", "weight decay"),
        ("momentum", "teacher momentum"),
        ("teacher_temp", "teacher temperature"),
    )
    fig = new_figure((13, 3.0))
    axes = fig.subplots(1, len(panels))
    for label, schedules in runs.items():
        x = np.arange(len(schedules)) / len(schedules)  # fraction of the run, (n_steps,)
        for ax, (attr, _) in zip(axes, panels, strict=True):
            ax.plot(x, getattr(schedules, attr), label=label)
        frozen = schedules.freeze_steps / len(schedules)
        axes[0].axvspan(0, frozen, alpha=0.08, color=axes[0].lines[-1].get_color())
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("fraction of the run")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, title="shaded: last layer frozen", title_fontsize=7)
    fig.tight_layout()
    return fig


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
