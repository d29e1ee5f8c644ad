"""Training configuration: one dataclass whose defaults are the ImageNette recipe, and presets.

Every default names its source: **paper** (DINO's official ViT-S/16 recipe, Caron et al.
2021, App. A and the official ``main_dino.py``), **tutorial** (the notebook this project
grew from), or **ours** (a choice for ImageNette or for a CPU). ``tests/test_config.py``
pins them, because the sources disagree and each choice must be deliberate.

Each field carries its help text and its group in ``dataclasses.field(metadata=...)``;
``dino_nb.cli`` builds the command line from them, so a new field is one edit here (plus
its pinned default in the test).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
Centering = Literal["center", "sinkhorn"]  # dino_nb.loss.CENTERINGS

#: Groups of fields, in the order ``--help`` lists them.
GROUPS = ("data", "model", "optimisation", "evaluation", "run")


def _field(default: Any, help: str, group: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text and a ``--help`` group (mutable defaults copied)."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}")
    metadata = {"help": help, "group": group}
    if isinstance(default, dict | list):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata=metadata, **kwargs
        )
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """Everything a DINO training run needs; build variants with ``dataclasses.replace``.

    Defaults are the ``imagenette`` preset: ViT-S/16, 2 global crops at 224 and 8 local
    crops at 96, the paper's schedules, a per-GPU batch that fits a 16 GB GPU.
    """

    # --- data ---
    data: str = _field(
        "imagenette",
        "'imagenette' (found or downloaded), 'builtin', or a folder holding train/ and val/",
        "data",
    )
    strict_data: bool = _field(
        False, "unreadable images are fatal (default: skipped with one warning)", "data"
    )
    global_size: int = _field(224, "side of the global crops in pixels (paper: 224)", "data")
    local_size: int = _field(
        96, "side of the local crops (paper: 96; the tutorial used 224 for all)", "data"
    )
    n_local_crops: int = _field(
        8, "local crops per image (paper: 8; the tutorial's -c counts all crops)", "data"
    )
    global_crops_scale: tuple[float, float] = _field(
        (0.4, 1.0), "range of the image area a global crop covers (paper)", "data"
    )
    local_crops_scale: tuple[float, float] = _field(
        (0.05, 0.4), "range of the image area a local crop covers (paper)", "data"
    )
    blur_sigma: tuple[float, float] = _field(
        (0.1, 2.0),
        "range of the Gaussian blur's sigma in pixels of a view (paper, for 224-pixel crops)",
        "data",
    )
    gpu_augment: bool | Literal["auto"] = _field(
        "auto",
        "crops and colour ops on the GPU, the CPU only decodes; auto: on where the CPU's loader "
        "workers cannot feed the GPU (a Kaggle or Colab T4), off on the CPU",
        "data",
    )
    cache_pixels: bool = _field(
        False,
        "decode every photo once into a uint8 canvas cache and augment batches as tensors (fast on small CPUs)",
        "data",
    )
    canvas_size: int | None = _field(
        None,
        "side of the square canvas each photo is resized to before --cache-pixels / --gpu-augment "
        "cut crops from it (default: global size x 256/224, evaluation's resize)",
        "data",
    )
    num_workers: int | None = _field(
        None, "data loader workers (default: from the CPU count)", "data"
    )

    # --- model ---
    model: str = _field(
        "vit_small_patch16_224",
        "timm model name (paper: ViT-S/16; the tutorial's name no longer exists in timm)",
        "model",
    )
    model_kwargs: dict[str, Any] = _field(
        {}, 'extra timm kwargs as JSON, e.g. \'{"img_size": 64, "depth": 6}\'', "model"
    )
    pretrained: bool = _field(
        False, "start from timm's supervised weights (tutorial's --pretrained)", "model"
    )
    drop_path_rate: float = _field(0.1, "stochastic depth of the student (paper: 0.1)", "model")
    out_dim: int = _field(
        65536,
        "head output dimension K, the number of prototypes (paper: 65536; tutorial: 1024)",
        "model",
    )
    hidden_dim: int = _field(2048, "width of the head's MLP (paper: 2048; tutorial: 512)", "model")
    bottleneck_dim: int = _field(
        256, "head bottleneck before the last layer (paper and tutorial)", "model"
    )
    head_layers: int = _field(3, "layers of the head's MLP (paper and tutorial)", "model")
    norm_last_layer: bool = _field(
        True,
        "freeze the norm g of the last layer at 1 (the official default; its help says False performs better but can be unstable)",
        "model",
    )
    use_bn_in_head: bool = _field(
        False,
        "BatchNorm after each hidden layer of the head (the official option; off for ViTs there)",
        "model",
    )

    # --- optimisation ---
    batch_size: int = _field(
        64,
        "images per step per process (ours: fits ViT-S multi-crop in 16 GB with mixed precision)",
        "optimisation",
    )
    epochs: int = _field(
        100,
        "length of the recipe in epochs; the schedules span it (paper's shortest schedule)",
        "optimisation",
    )
    minutes: float | None = _field(
        None,
        "wall-time budget: measure the step time, then fit the whole recipe (all schedules) into this many minutes",
        "optimisation",
    )
    max_steps: int | None = _field(
        None, "stop after this many steps (the schedules still span the recipe)", "optimisation"
    )
    base_lr: float = _field(
        5e-4, "learning rate for a global batch of 256, scaled linearly (paper)", "optimisation"
    )
    min_lr: float = _field(1e-6, "learning rate at the end of the cosine (paper)", "optimisation")
    warmup_epochs: int = _field(10, "epochs of linear learning-rate warmup (paper)", "optimisation")
    weight_decay: float = _field(
        0.04, "weight decay at the start, cosine to --weight-decay-end (paper)", "optimisation"
    )
    weight_decay_end: float = _field(
        0.4, "weight decay at the end (paper; the tutorial kept 0.4)", "optimisation"
    )
    momentum_teacher: float = _field(
        0.996,
        "teacher EMA momentum at the start, cosine to --momentum-teacher-end (paper; tutorial: 0.9995)",
        "optimisation",
    )
    momentum_teacher_end: float = _field(
        1.0, "teacher EMA momentum at the end (paper: 1)", "optimisation"
    )
    warmup_teacher_temp: float = _field(
        0.04, "teacher temperature at the start (paper)", "optimisation"
    )
    teacher_temp: float = _field(
        0.07, "teacher temperature after the warmup (paper's longer recipe)", "optimisation"
    )
    warmup_teacher_temp_epochs: int = _field(
        30, "epochs of linear teacher-temperature warmup (paper's longer recipe)", "optimisation"
    )
    student_temp: float = _field(0.1, "student temperature (paper and tutorial)", "optimisation")
    center_momentum: float = _field(
        0.9, "EMA rate of the teacher's center (paper and tutorial)", "optimisation"
    )
    teacher_centering: Centering = _field(
        "center",
        "'center' (the paper's EMA center) or 'sinkhorn' (targets balanced over the batch by "
        "Sinkhorn-Knopp, as in DINOv2)",
        "optimisation",
    )
    koleo_weight: float = _field(
        0.0,
        "weight of the KoLeo regulariser that spreads the student's global-crop embeddings "
        "over the batch (0: off, as in the paper; DINOv2: 0.1)",
        "optimisation",
    )
    clip_grad: float = _field(
        3.0,
        "per-tensor gradient norm limit, 0 turns it off (paper: 3; tutorial: 2)",
        "optimisation",
    )
    freeze_last_layer: int = _field(
        1, "epochs during which the last layer's gradients are cancelled (paper)", "optimisation"
    )
    precision: Precision = _field(
        "auto",
        "auto: bf16 on GPUs with native bf16 (compute capability 8.0+: A100, L4, H100), fp16 "
        "with a loss scaler on older ones (T4, P100, V100), fp32 on the CPU",
        "optimisation",
    )
    compile: bool = _field(
        False, "torch.compile the backbones (slow to start, faster after)", "optimisation"
    )
    device: Device = _field("auto", "auto picks CUDA when present (tutorial's -d)", "optimisation")
    seed: int = _field(0, "seed of the weights, the order and the augmentations", "optimisation")

    # --- evaluation, logging, checkpoints ---
    eval_every: int = _field(
        1000, "steps between kNN evaluations (tutorial's --logging-freq)", "evaluation"
    )
    eval_train_subset: int = _field(
        5000, "training images in the kNN memory bank during training", "evaluation"
    )
    batch_size_eval: int = _field(128, "images per evaluation batch (tutorial: 64)", "evaluation")
    knn_k: int = _field(20, "neighbours of the weighted kNN (paper: 20)", "evaluation")
    knn_temperature: float = _field(
        0.07, "temperature of the weighted kNN votes (paper)", "evaluation"
    )
    projector_size: int = _field(
        200, "validation images sent to TensorBoard's projector at the end (0: off)", "evaluation"
    )
    log_every: int = _field(10, "steps between lines of metrics.jsonl (and loss checks)", "run")
    save_every: int = _field(1000, "steps between checkpoints (also at each epoch's end)", "run")
    out: str | None = _field(
        None, "run folder (default runs/<timestamp>); resumes when it holds a checkpoint", "run"
    )
    tensorboard_dir: str | None = _field(
        None, "TensorBoard folder (default: the run folder; tutorial's -t)", "run"
    )
    resume: str = _field(
        "auto",
        "'auto' (resume when --out holds a checkpoint), 'never', or a checkpoint path",
        "run",
    )
    progress: bool = _field(True, "show a progress bar", "run")

    @property
    def n_crops(self) -> int:
        """Global plus local crops per image."""
        return 2 + self.n_local_crops

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and ``weights_only``-safe) of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The resolved configuration as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        values = dict(values)
        for key in ("global_crops_scale", "local_crops_scale", "blur_sigma"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def validate(cfg: TrainConfig) -> None:
    """Refuse contradictory or impossible settings before any work starts.

    Raises:
        ValueError: one message listing every problem found.
    """
    problems = []
    for name in (
        "batch_size",
        "epochs",
        "eval_every",
        "log_every",
        "save_every",
        "out_dim",
        "global_size",
        "local_size",
    ):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.canvas_size is not None and cfg.canvas_size < cfg.global_size:
        problems.append(
            f"canvas_size ({cfg.canvas_size}) must be at least global_size ({cfg.global_size})"
        )
    if cfg.max_steps is not None and cfg.max_steps < 0:
        problems.append(f"max_steps must be >= 0, got {cfg.max_steps}")
    if cfg.minutes is not None and not (math.isfinite(cfg.minutes) and cfg.minutes > 0):
        problems.append(f"minutes must be a positive number, got {cfg.minutes}")
    if cfg.n_local_crops < 0:
        problems.append(
            f"n_local_crops must be >= 0 (2 global crops + n_local_crops), got {cfg.n_local_crops}"
        )
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        problems.append(
            f"warmup_epochs ({cfg.warmup_epochs}) must be between 0 and epochs ({cfg.epochs})"
        )
    if not 0 <= cfg.warmup_teacher_temp_epochs <= cfg.epochs:
        problems.append(
            f"warmup_teacher_temp_epochs ({cfg.warmup_teacher_temp_epochs}) must be between 0 and epochs ({cfg.epochs})"
        )
    if not 0 <= cfg.freeze_last_layer <= cfg.epochs:
        problems.append(
            f"freeze_last_layer ({cfg.freeze_last_layer}) must be between 0 and epochs ({cfg.epochs})"
        )
    for name in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
        if not 0 <= getattr(cfg, name) <= 1:
            problems.append(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("teacher_temp", "warmup_teacher_temp", "student_temp", "base_lr"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.teacher_centering not in typing.get_args(Centering):
        problems.append(
            f"teacher_centering must be one of {typing.get_args(Centering)}, got {cfg.teacher_centering!r}"
        )
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(cfg, name)
        if not 0 < low <= high <= 1:
            problems.append(f"{name} must be 0 < low <= high <= 1, got {getattr(cfg, name)}")
    low, high = cfg.blur_sigma
    if not 0 < low <= high:
        problems.append(f"blur_sigma must be 0 < low <= high, got {cfg.blur_sigma}")
    if cfg.koleo_weight < 0:
        problems.append(f"koleo_weight must be >= 0 (0 turns it off), got {cfg.koleo_weight}")
    if cfg.clip_grad < 0:
        problems.append(f"clip_grad must be >= 0 (0 turns it off), got {cfg.clip_grad}")
    if cfg.gpu_augment not in (True, False, "auto"):
        problems.append(f"gpu_augment must be true, false or 'auto', got {cfg.gpu_augment!r}")
    for name, kind in (("precision", Precision), ("device", Device)):
        if getattr(cfg, name) not in typing.get_args(kind):
            problems.append(
                f"{name} must be one of {typing.get_args(kind)}, got {getattr(cfg, name)!r}"
            )
    if cfg.precision == "fp16" and cfg.device == "cpu":  # device auto: resolve_precision checks
        problems.append("precision fp16 needs a GPU (device is 'cpu'); use fp32 or bf16")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_file():
        problems.append(f"resume: checkpoint not found: {cfg.resume}")
    if problems:
        raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- presets


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
    "steps, no time budget: kNN 41.5% -> 54% with the same numbers on every machine (squeezed "
    "into 1.75 minutes, 198 steps on a slower CPU, it ended in the early dip of its kNN curve: "
    "39%)",
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
            "notebook 05's attention maps are the [CLS] token's; about 2 points of kNN less",
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
    record, cfg, defaults = _record(name), preset(name), TrainConfig()
    return [
        Change(key, getattr(defaults, key), getattr(cfg, key), record.reasons[key])
        for key in record.values
        if getattr(cfg, key) != getattr(defaults, key)
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
    rows = [r for c in preset_changes(name) for r in _rows(c.field, c.default, c.value, c.reason)]
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
