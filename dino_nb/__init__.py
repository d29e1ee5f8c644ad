"""dino-nb: DINO (self-distillation with no labels) with timm Vision Transformers.

The building blocks keep the names of the tutorial this project grew from:
``DataAugmentation``, ``Head``, ``MultiCropWrapper``, ``Loss``, ``clip_gradients``,
``compute_knn`` and ``compute_embedding``; ``DINOHead`` and ``DINOLoss`` are the same
classes under the official code's names.
"""

import importlib
from typing import Any

from . import fast  # noqa: F401, I001  registers the fast crop pipelines with the loader
from .augment import DataAugmentation, denormalize, normalize_uint8
from .loss import DINOLoss, Loss
from .model import (
    DINOHead,
    Head,
    MultiCropWrapper,
    backbone_from_checkpoint,
    build_backbone,
    build_student_teacher,
)
from .step import clip_gradients, cosine_schedule, linear_warmup_schedule

__version__ = "0.1.0"

# Imported on first use: the loop, the step and the presets import most of the package,
# and ``evaluation`` brings scikit-learn, which only evaluation needs.
_LAZY = {
    name: "evaluation"
    for name in ("compute_embedding", "compute_knn", "extract_features", "weighted_knn")
}
_LAZY.update({name: "loop" for name in ("TrainResult", "export_backbone")})
_LAZY.update({name: "step" for name in ("Run", "build_run", "train_step")})
_LAZY.update({"TrainConfig": "config", "preset": "tools.presets"})


def __getattr__(name: str) -> Any:
    """Import ``compute_knn``, ``train``, ... from their modules on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataAugmentation",
    "TrainConfig",
    "Run",
    "TrainResult",
    "DINOHead",
    "DINOLoss",
    "Head",
    "Loss",
    "MultiCropWrapper",
    "backbone_from_checkpoint",
    "build_backbone",
    "build_run",
    "build_student_teacher",
    "clip_gradients",
    "compute_embedding",
    "compute_knn",
    "cosine_schedule",
    "denormalize",
    "extract_features",
    "linear_warmup_schedule",
    "normalize_uint8",
    "export_backbone",
    "preset",
    "train_step",
    "weighted_knn",
]
