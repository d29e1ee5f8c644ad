"""Named recipes: each a few changes to :class:`~dino_nb.config.TrainConfig`'s defaults, each change with its reason.

The defaults are the paper's ViT-S/16 recipe on ImageNette (``imagenette``). The other presets
say what they change and why, as data: ``python -m dino_nb.train --preset cpu --print-config``
and :func:`describe_preset` print it as a table.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import textwrap
from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig, validate


@dataclass(frozen=True)
class Preset:
    """A named starting configuration: its overrides of the defaults, each with its reason.

    Attributes:
        summary: what the preset is for, in one line.
        values: field -> value, the overrides :func:`preset` applies (what ``PRESETS[name]`` holds).
        reasons: field -> why the value departs from the default (one or two sentences).
    """

    summary: str
    values: dict[str, Any]
    reasons: dict[str, str]

    def changed(self, summary: str, *groups: tuple[dict[str, Any], str]) -> Preset:
        """This preset with ``groups`` of changes on top, each ``({field: value, ...}, reason)``.

        A field set again moves to the end, so that the fields sharing a reason stay together.
        """
        values, reasons = dict(self.values), dict(self.reasons)
        for changes, reason in groups:
            for name, value in changes.items():
                values.pop(name, None)
                values[name] = value
                reasons[name] = reason
        return Preset(summary, values, reasons)


#: The defaults themselves: the ``imagenette`` preset.
_DEFAULTS = Preset(
    "the defaults: the paper's ViT-S/16 recipe on ImageNette (crops, schedules, head), with "
    "64 images per GPU where the paper has 1024 in all",
    {},
    {},
)

#: The notebooks' recipe on the built-in shapes; ``cpu-quick`` and ``cpu-photos`` start from it.
#: Where it departs from the paper, it is mostly because 372 steps are not 300 epochs.
_CPU = _DEFAULTS.changed(
    "the notebooks' recipe: a 4-block ViT on the 48-pixel built-in shapes for a fixed 372 "
    "steps, no time budget: kNN 41.5% -> 60.5% with the same numbers on every machine",
    ({"data": "builtin"}, "the built-in shapes of 10 classes: generated on first use, no download"),
    (
        {"model": "vit_tiny_patch16_224", "global_size": 48, "local_size": 24},
        "a ViT small enough for a CPU: timm's ViT-Ti reshaped by model_kwargs, on 48-pixel "
        "global and 24-pixel local crops",
    ),
    (
        {
            "model_kwargs": {
                "img_size": 48,
                "patch_size": 8,
                "depth": 4,
                "embed_dim": 128,
                "num_heads": 4,
            }
        },
        "4 blocks of width 128 (4 heads) and 8x8 patches: 36 patches per global crop, 9 per "
        "local one",
    ),
    (
        {"drop_path_rate": 0.0},
        "no stochastic depth: the paper's 0.1 regularises 12 blocks over 100 epochs, not a few "
        "blocks in a short run",
    ),
    (
        {"out_dim": 256, "hidden_dim": 512},
        "a head for a small backbone and 10 classes: K = 256 prototypes (paper: 65,536) and "
        "an MLP of width 512 (the tutorial's)",
    ),
    (
        {"norm_last_layer": False},
        "the prototypes' lengths are learned: the official help says this performs better "
        "but can be unstable",
    ),
    ({"n_local_crops": 4}, "4 local crops instead of 8: less work per step"),
    (
        {"local_crops_scale": (0.1, 0.4)},
        "no local crop under 10% of the image (paper: 5%): the 48-pixel shapes have little "
        "detail to zoom into",
    ),
    (
        {"blur_sigma": (0.1, 2.0)},
        "kept: the paper's blur in pixels, so on 48- and 24-pixel crops it blurs 4.7x and 4x "
        "more, relative to the crop, than on the paper's 224 and 96. Scaled to 48 pixels, "
        "(0.021, 0.43), the recipe ended at kNN 54.0% instead of 60.5% (one run each)",
    ),
    ({"batch_size": 32}, "half the default batch: cheaper steps, so a short run has more of them"),
    ({"epochs": 12}, "the recipe's length: 12 epochs of 31 batches, 372 steps"),
    (
        {"base_lr": 5e-3},
        "a short run takes larger steps: a peak lr of 0.000625 at batch 32 (the imagenette "
        "preset's: 0.000125 at 64)",
    ),
    ({"warmup_epochs": 2}, "a short warmup: 2 of the 12 epochs (62 steps)"),
    (
        {"momentum_teacher": 0.99, "momentum_teacher_end": 0.99},
        "the teacher averages the last ~100 students throughout: with the paper's cosine to 1 "
        "it freezes while the student still improves fast, and ends far behind it",
    ),
    (
        {"teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0},
        "the teacher temperature stays at its starting 0.04 (the official default): in a short "
        "run a warmup to 0.07 would barely end",
    ),
    (
        {"eval_every": 100, "save_every": 100},
        "an evaluation and a checkpoint every 100 steps: a few in a run of a few hundred",
    ),
    ({"eval_train_subset": 1000}, "all 1,000 training shapes in the kNN memory bank"),
    ({"projector_size": 100}, "100 validation images in TensorBoard's projector: quicker to write"),
)

#: Photos on a CPU. The photos' changes, each measured on ImageNette at 128 pixels (weighted kNN,
#: k=20, full memory bank; 5-minute runs unless noted); the search log is in the README.
_PHOTOS = _CPU.changed(
    "photos on a CPU (ImageNette or a folder) in a 15-minute budget: a pixel cache and the "
    "cpu recipe's ViT with 3 blocks; kNN 45.4-47.0% on ImageNette at 128 pixels",
    (
        {"minutes": 15.0},
        "a 15-minute budget, about 2,600 steps on 2 cores: kNN 39.0% at 5 minutes, 45.4% at 15",
    ),
    (
        {"cache_pixels": True},
        "each photo is decoded once into a uint8 cache and the crops are cut from it in "
        "batches: one loader worker makes ~430 images/s, the step eats 80-105",
    ),
    (
        {"data": "imagenette", "local_crops_scale": (0.05, 0.4)},
        "the defaults again: ImageNette (or --data a folder of photos), the paper's local crops",
    ),
    (
        {"use_bn_in_head": True},
        "a fresh ViT gives every photo nearly the same embedding, so the teacher's softmax "
        "stays uniform; BatchNorm in the head standardises each hidden feature over the "
        "batch: kNN 30 -> 33%",
    ),
    (
        {"model_kwargs": {**_CPU.values["model_kwargs"], "depth": 3, "global_pool": "avg"}},
        "the cpu recipe's ViT with 3 blocks instead of 4: ~2,800 steps in 15 minutes "
        "instead of ~2,100, kNN 41.0 -> 41.8%, linear probe 50.9 -> 53.8%. The average of "
        "the patch tokens as the embedding: kNN 33 -> 35%, but [CLS] attention maps no "
        "longer mean anything",
    ),
    (
        {"blur_sigma": (0.1 * 48 / 224, 2.0 * 48 / 224)},
        "the paper's (0.1, 2) is for 224-pixel crops, scaled to 48: the same kNN, and the "
        "smaller kernel makes steps ~15% cheaper",
    ),
    (
        {"koleo_weight": 0.1},
        "DINOv2's KoLeo at DINOv2's weight spreads the embeddings over the sphere, and kNN "
        "compares their distances: 36.1 -> 38.5% at 900 steps, 41.8 -> 45.4% and 47.0% at "
        "15 minutes; the linear probe does not gain (53.8 -> 51.9%)",
    ),
    (
        {"momentum_teacher": 0.98, "momentum_teacher_end": 0.98},
        "a teacher that follows the student faster in a run of ~2,000 steps: kNN 35.0 -> 35.6%",
    ),
    (
        {"epochs": 10, "warmup_epochs": 1},
        "the recipe's shape (the budget decides how many steps it spans): a warmup of 10% "
        "of the run",
    ),
    (
        {"eval_every": 500, "eval_train_subset": 2000, "save_every": 500},
        "evaluations and checkpoints sized to a run of a few thousand steps on 8,500 photos",
    ),
)

#: Named starting configurations, each change with its reason (``describe_preset`` prints
#: them; ``--print-config`` too). The presets' values fix every number the notebooks print.
PRESET_RECORDS: dict[str, Preset] = {
    "cpu": _CPU,
    "cpu-quick": _CPU.changed(
        "the main job (python -m dino_nb.train on a CPU): the cpu recipe in a 2-minute budget, "
        "so that it takes about 2 minutes on any CPU",
        (
            {"minutes": 2.0},
            "a 2-minute budget: the first steps are timed, then the whole recipe (warmups, "
            "cosines) is laid over the steps that fit",
        ),
        (
            {"use_bn_in_head": True},
            "in 2 minutes the cpu recipe ends in the early dip of its kNN curve (41.5 -> 36.0% "
            "after 170 steps, what a 2-core AVX2 CPU fits); BatchNorm in the head: 41.5 -> 47.5%",
        ),
        (
            {"model_kwargs": {**_CPU.values["model_kwargs"], "depth": 3}},
            "the cpu recipe's ViT with 3 blocks instead of 4: 25% cheaper steps; with the head's "
            "BatchNorm 42.0 -> 57.5% after 220 steps. The [CLS] token stays the embedding",
        ),
    ),
    "cpu-photos": _PHOTOS,
    "cpu-photos-cls": _PHOTOS.changed(
        "cpu-photos with the [CLS] token as the embedding, so that attention maps mean something "
        "(the notebooks' cpu profile with ImageNette)",
        (
            {"model_kwargs": {**_PHOTOS.values["model_kwargs"], "global_pool": "token"}},
            "cpu-photos' 3-block ViT with the [CLS] token as the embedding (timm's default): "
            "notebook 05's attention maps are the [CLS] token's. 10 epochs with --minutes none "
            "(2,660 steps, 53 minutes on 2 busy cores): weighted kNN 29.9% -> 40.7% on the "
            "developers' 128-pixel ImageNette, linear probe 37.4% -> 48.8%",
        ),
    ),
    "imagenette": _DEFAULTS,
    "t4": _DEFAULTS.changed(
        "a 16 GB card in fp16 (a Kaggle or Colab T4, a P100): ViT-Ti/16 with the paper's crops "
        "and schedules",
        ({"model": "vit_tiny_patch16_224"}, "ViT-Ti/16 trains about 3x faster than ViT-S/16"),
        (
            {"batch_size": 128},
            "twice the default batch per step, which the smaller model leaves room for in 16 GB",
        ),
        (
            {"out_dim": 16384},
            "a quarter of the paper's 65,536 prototypes: a head in proportion to the smaller "
            "backbone",
        ),
    ),
}
#: Overrides of the defaults per preset (``imagenette`` is the defaults themselves).
PRESETS: dict[str, dict[str, Any]] = {name: p.values for name, p in PRESET_RECORDS.items()}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` for a named preset, with ``overrides`` applied on top.

    Raises:
        ValueError: for an unknown preset name or field, or settings that contradict each other.
    """
    values = {**copy.deepcopy(_record(name).values), **overrides}  # a run may edit model_kwargs
    cfg = TrainConfig.from_dict(values)
    validate(cfg)
    return cfg


def _record(name: str) -> Preset:
    if name not in PRESET_RECORDS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESET_RECORDS)}")
    return PRESET_RECORDS[name]


@dataclass(frozen=True)
class Change:
    """One field a preset changes: its default, the preset's value, and why."""

    field: str
    default: Any
    value: Any
    reason: str


def preset_changes(name: str) -> list[Change]:
    """The fields where preset ``name`` differs from the defaults, each with its reason.

    Raises:
        ValueError: for an unknown preset name.
    """
    return [c for c in _named(name) if c.value != c.default]


def _named(name: str) -> list[Change]:
    """Every field preset ``name`` names, in its order, each with its reason.

    Its changes, and the fields it keeps at the default on purpose (the ``cpu`` preset's blur
    in pixels), which :func:`describe_preset` lists too.
    """
    record, cfg, defaults = _record(name), preset(name), TrainConfig()
    return [
        Change(key, getattr(defaults, key), getattr(cfg, key), record.reasons[key])
        for key in record.values
    ]


#: Columns of :func:`describe_preset`, and the width it wraps the reasons to.
_HEAD = ("field", "default", "preset", "why")
_WHY_WIDTH = 64
_UNSET = object()  # a model_kwargs key that is not given


def describe_preset(name: str, cfg: TrainConfig | None = None) -> str:
    """What preset ``name`` changes against the defaults, and why, as an aligned table.

    A ``model_kwargs`` change is shown key by key (``-``: not given, timm's default).

    Args:
        name: a preset name.
        cfg: a configuration built from that preset: its own departures from the preset
            (options, ``--config``, a notebook's overrides) follow in a second table.

    Raises:
        ValueError: for an unknown preset name.
    """
    rows = [r for c in _named(name) for r in _rows(c.field, c.default, c.value, c.reason)]
    extra = []
    if cfg is not None:
        base = preset(name)
        for f in dataclasses.fields(TrainConfig):
            theirs, mine = getattr(base, f.name), getattr(cfg, f.name)
            extra += _rows(f.name, theirs, mine, "") if mine != theirs else []
    widths = [max(len(row[i]) for row in (_HEAD, *rows, *extra)) for i in range(3)]
    lines = textwrap.wrap(f"preset {name!r}: {_record(name).summary}", 100)
    lines += _table([_HEAD, *rows], widths) if rows else ["(no changes: the defaults)"]
    if cfg is not None and extra:
        lines += [
            "on top of the preset:",
            *_table([("field", "preset", "now", ""), *extra], widths),
        ]
    elif cfg is not None:
        lines.append("nothing on top of the preset")
    return "\n".join(lines)


def _rows(field: str, old: Any, new: Any, reason: str) -> list[tuple[str, str, str, str]]:
    """Table rows ``(field, old, new, reason)`` of one change; a dict's changed keys one by one."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k, _UNSET) != new.get(k, _UNSET)]
        return [
            (f"{field}.{k}", _shown(old.get(k, _UNSET)), _shown(new.get(k, _UNSET)), reason)
            for k in keys
        ]
    return [(field, _shown(old), _shown(new), reason)]


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return f"({', '.join(map(_shown, value))})"
    return str(value)


def _table(rows: list[tuple[str, str, str, str]], widths: list[int]) -> list[str]:
    """Aligned lines ``field  old -> new  why``; rows that share a reason share its wrapped lines."""
    lines = []
    for reason, same in itertools.groupby(rows, key=lambda row: row[3]):
        group, why = list(same), textwrap.wrap(reason, _WHY_WIDTH)
        for i in range(max(len(group), len(why))):
            field, old, new = group[i][:3] if i < len(group) else ("", "", "")
            arrow = "->" if field else "  "
            text = why[i] if i < len(why) else ""
            lines.append(
                f"{field:{widths[0]}}  {old:{widths[1]}} {arrow} {new:{widths[2]}}  {text}".rstrip()
            )
    return lines
