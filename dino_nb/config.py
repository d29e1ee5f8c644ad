"""Training configuration: one dataclass whose defaults are the ImageNette recipe, and presets.

Every default names its source: **paper** (DINO's official ViT-S/16 recipe, Caron et al.
2021, App. A and the official ``main_dino.py``), **tutorial** (the notebook this project
grew from), or **ours** (a choice for ImageNette or for a CPU). ``tests/test_config.py``
pins them, because the sources disagree and each choice must be deliberate.

Each field carries its help text and its group in ``dataclasses.field(metadata=...)``;
``dino_nb.tools.cli`` builds the command line from them, so a new field is one edit here (plus
its pinned default in the test).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
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
        8,
        "local crops per image (the official code's default; the tutorial's -c counts all crops)",
        "data",
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
        0.07, "teacher temperature after the warmup (the paper: 0.04 -> 0.07)", "optimisation"
    )
    warmup_teacher_temp_epochs: int = _field(
        30, "epochs of linear teacher-temperature warmup (the paper: the first 30)", "optimisation"
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


#: Fields that must be positive.
_POSITIVE = (
    "batch_size", "epochs", "eval_every", "log_every", "save_every", "out_dim", "global_size",
    "local_size", "teacher_temp", "warmup_teacher_temp", "student_temp", "base_lr",
)  # fmt: skip
#: Fields that may be 0 (off, or none), with what 0 means.
_NON_NEGATIVE = {
    "n_local_crops": "2 global crops + n_local_crops",
    "koleo_weight": "0 turns it off",
    "clip_grad": "0 turns it off",
}
#: Momenta: fractions.
_UNIT_INTERVAL = ("momentum_teacher", "momentum_teacher_end", "center_momentum")
#: Epoch counts inside the run.
_WITHIN_EPOCHS = ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer")
#: Fields whose values are named.
_CHOICES = {"teacher_centering": Centering, "precision": Precision, "device": Device}


def _range_problems(cfg: TrainConfig) -> list[str]:
    """Each field outside its range, one message each."""
    value = functools.partial(getattr, cfg)
    problems = [f"{n} must be positive, got {value(n)}" for n in _POSITIVE if value(n) <= 0]
    problems += [
        f"{n} must be >= 0 ({why}), got {value(n)}"
        for n, why in _NON_NEGATIVE.items()
        if value(n) < 0
    ]
    problems += [
        f"{n} must be in [0, 1], got {value(n)}" for n in _UNIT_INTERVAL if not 0 <= value(n) <= 1
    ]
    problems += [
        f"{n} ({value(n)}) must be between 0 and epochs ({cfg.epochs})"
        for n in _WITHIN_EPOCHS
        if not 0 <= value(n) <= cfg.epochs
    ]
    problems += [
        f"{n} must be one of {typing.get_args(kind)}, got {value(n)!r}"
        for n, kind in _CHOICES.items()
        if value(n) not in typing.get_args(kind)
    ]
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = value(name)
        if not 0 < low <= high <= 1:
            problems.append(f"{name} must be 0 < low <= high <= 1, got {value(name)}")
    if not 0 < cfg.blur_sigma[0] <= cfg.blur_sigma[1]:
        problems.append(f"blur_sigma must be 0 < low <= high, got {cfg.blur_sigma}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        problems.append(f"max_steps must be >= 0, got {cfg.max_steps}")
    if cfg.minutes is not None and not (math.isfinite(cfg.minutes) and cfg.minutes > 0):
        problems.append(f"minutes must be a positive number, got {cfg.minutes}")
    if cfg.gpu_augment not in (True, False, "auto"):
        problems.append(f"gpu_augment must be true, false or 'auto', got {cfg.gpu_augment!r}")
    return problems


def _contradictions(cfg: TrainConfig) -> list[str]:
    """Settings that are fine alone and impossible together, or that point at nothing."""
    problems = []
    if cfg.canvas_size is not None and cfg.canvas_size < cfg.global_size:
        problems.append(
            f"canvas_size ({cfg.canvas_size}) must be at least global_size ({cfg.global_size})"
        )
    if cfg.precision == "fp16" and cfg.device == "cpu":  # device auto: resolve_precision checks
        problems.append("precision fp16 needs a GPU (device is 'cpu'); use fp32 or bf16")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_file():
        problems.append(f"resume: checkpoint not found: {cfg.resume}")
    return problems


def validate(cfg: TrainConfig) -> None:
    """Refuse contradictory or impossible settings before any work starts.

    The one home of the config's rules: the building blocks check only their own arguments.

    Raises:
        ValueError: one message listing every problem found.
    """
    problems = _range_problems(cfg) + _contradictions(cfg)
    if problems:
        raise ValueError("; ".join(problems))
