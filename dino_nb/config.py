"""Training configuration: one dataclass whose defaults are the ImageNette recipe, and presets.

Every default names its source: **paper** (DINO's official ViT-S/16 recipe, Caron et al.
2021, App. A and the official ``main_dino.py``), **tutorial** (the notebook this project
grew from), or **ours** (a choice for ImageNette or for a CPU). ``tests/test_config.py``
pins them, because the sources disagree and each choice must be deliberate.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class TrainConfig:
    """Everything a DINO training run needs; build variants with ``dataclasses.replace``.

    Defaults are the ``imagenette`` preset: ViT-S/16, 2 global crops at 224 and 8 local
    crops at 96, the paper's schedules, a per-GPU batch that fits a 16 GB GPU.
    """

    # --- data ---
    data: str = "imagenette"  # ours: "imagenette" (found or downloaded), "builtin", or a folder
    strict_data: bool = False  # ours: skip unreadable images with one warning; True makes them fatal
    global_size: int = 224  # paper: global crops at 224
    local_size: int = 96  # paper: local crops at 96 (the tutorial used 224 for all)
    n_local_crops: int = 8  # paper: 8 local crops (tutorial: -c 4 crops in all, i.e. 2 local)
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # paper, with local crops
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # paper
    gpu_augment: bool = False  # ours: run crops and colour ops on the GPU (for 2-core machines)
    num_workers: int | None = None  # ours: None picks from the CPU count

    # --- model ---
    model: str = "vit_small_patch16_224"  # paper: ViT-S/16 (the tutorial's name no longer exists in timm)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # ours: extra timm kwargs (img_size, depth, ...)
    pretrained: bool = False  # tutorial: --pretrained starts from timm's supervised weights
    drop_path_rate: float = 0.1  # paper: stochastic depth 0.1, student only
    out_dim: int = 65536  # paper: K = 65536 prototypes (tutorial: 1024)
    hidden_dim: int = 2048  # paper: head MLP width (tutorial: 512)
    bottleneck_dim: int = 256  # paper and tutorial
    head_layers: int = 3  # paper and tutorial
    norm_last_layer: bool = True  # paper: True is the stable choice for ViT-S (tutorial: False)

    # --- optimisation ---
    batch_size: int = 64  # ours: per GPU; fits ViT-S multi-crop in 16 GB with mixed precision
    epochs: int = 100  # paper's shortest schedule
    max_steps: int | None = None  # ours: stop early (schedules still span `epochs`)
    base_lr: float = 5e-4  # paper: lr = base_lr * global_batch / 256
    min_lr: float = 1e-6  # paper: end of the cosine
    warmup_epochs: int = 10  # paper: linear lr warmup
    weight_decay: float = 0.04  # paper: cosine 0.04 -> 0.4
    weight_decay_end: float = 0.4  # paper (tutorial: constant 0.4)
    momentum_teacher: float = 0.996  # paper: cosine 0.996 -> 1 (tutorial: constant 0.9995)
    momentum_teacher_end: float = 1.0  # paper: the teacher freezes at the end of the schedule
    warmup_teacher_temp: float = 0.04  # paper: teacher temperature at the start
    teacher_temp: float = 0.07  # paper's longer recipe: 0.04 -> 0.07
    warmup_teacher_temp_epochs: int = 30  # paper's longer recipe
    student_temp: float = 0.1  # paper and tutorial
    center_momentum: float = 0.9  # paper and tutorial
    clip_grad: float = 3.0  # paper (tutorial: 2.0); 0 turns clipping off
    freeze_last_layer: int = 1  # paper: last layer's gradients cancelled in the first epoch
    precision: Precision = "auto"  # ours: bf16 where supported, fp16 on older GPUs, fp32 on CPU
    compile: bool = False  # ours: torch.compile the backbones (slow to start, faster after)
    device: Device = "auto"  # tutorial's -d; auto picks CUDA when present
    seed: int = 0  # ours

    # --- evaluation, logging, checkpoints ---
    eval_every: int = 1000  # tutorial's --logging-freq (was 200 steps over the whole train set)
    eval_train_subset: int = 5000  # ours: kNN memory bank size; keeps evaluation under ~10% of time
    batch_size_eval: int = 128  # tutorial: 64
    knn_k: int = 20  # paper: k = 20
    knn_temperature: float = 0.07  # paper
    projector_size: int = 200  # ours: validation images sent to TensorBoard's projector (0: off)
    log_every: int = 10  # ours: steps between lines of metrics.jsonl
    save_every: int = 1000  # ours: steps between checkpoints (also at each epoch's end)
    out: str | None = None  # ours: run folder; default runs/<timestamp>
    tensorboard_dir: str | None = None  # tutorial's -t; default: the run folder
    resume: str = "auto"  # ours: "auto" (resume when `out` holds a checkpoint), "never", or a path
    progress: bool = True  # ours: tqdm progress bar

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
        for key in ("global_crops_scale", "local_crops_scale"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


#: Overrides of the defaults per preset. ``imagenette`` is the defaults themselves.
PRESETS: dict[str, dict[str, Any]] = {
    # The built-in main job: a 4-block ViT (width 128, 8x8 patches) on the 48-pixel built-in
    # shapes, about 2 minutes on 2 CPU cores. Where it departs from the paper, it is because
    # 370 steps are not 300 epochs: a short warmup, a higher base lr, a teacher momentum that
    # stays at 0.99 (with the paper's cosine to 1 the teacher freezes while the student is
    # still improving fast, and ends far behind it), and a smaller head.
    "cpu": dict(
        data="builtin",
        model="vit_tiny_patch16_224",
        model_kwargs={"img_size": 48, "patch_size": 8, "depth": 4, "embed_dim": 128, "num_heads": 4},
        drop_path_rate=0.0,
        out_dim=256,
        hidden_dim=512,
        norm_last_layer=False,
        global_size=48,
        local_size=24,
        n_local_crops=4,
        local_crops_scale=(0.1, 0.4),
        batch_size=32,
        epochs=12,
        base_lr=5e-3,
        warmup_epochs=2,
        momentum_teacher=0.99,
        momentum_teacher_end=0.99,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        eval_every=100,
        eval_train_subset=1000,
        projector_size=100,
        save_every=100,
    ),
    "imagenette": {},
    # a Kaggle T4 or P100 (16 GB, fp16): ViT-Tiny/16 trains about 3x faster than ViT-S/16
    "t4": dict(model="vit_tiny_patch16_224", batch_size=128, out_dim=16384),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` for a named preset, with ``overrides`` applied on top.

    Raises:
        ValueError: for an unknown preset name or field.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    return TrainConfig.from_dict(values)
