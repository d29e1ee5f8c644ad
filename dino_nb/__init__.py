"""dino-nb: DINO (self-distillation with no labels) with timm Vision Transformers.

The building blocks keep the names of the tutorial this project grew from:
``DataAugmentation``, ``Head``, ``MultiCropWrapper``, ``Loss``, ``clip_gradients``,
``compute_knn`` and ``compute_embedding``.
"""

from .augment import DataAugmentation, denormalize, normalize_uint8
from .evaluate import compute_embedding, compute_knn, extract_features, weighted_knn
from .head import Head
from .loss import Loss
from .models import backbone_from_checkpoint, build_backbone, build_student_teacher
from .multicrop import MultiCropWrapper
from .optim import clip_gradients
from .schedules import cosine_schedule, linear_warmup_schedule

__version__ = "0.1.0"

__all__ = [
    "DataAugmentation",
    "Head",
    "Loss",
    "MultiCropWrapper",
    "backbone_from_checkpoint",
    "build_backbone",
    "build_student_teacher",
    "clip_gradients",
    "compute_embedding",
    "compute_knn",
    "cosine_schedule",
    "denormalize",
    "extract_features",
    "linear_warmup_schedule",
    "normalize_uint8",
    "weighted_knn",
]
