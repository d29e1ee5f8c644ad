"""The speed machinery: the same multi-crop views as :class:`dino_nb.DataAugmentation`, made fast.

Two pipelines, registered with the loader (:func:`dino_nb.loader.register_crop_pipeline`) when
``dino_nb`` is imported, and chosen by the config:

* ``cache`` (``--cache-pixels``): every photo decoded once into a uint8 pixel cache; each loader
  worker cuts a whole batch's crops at once as tensors (:mod:`dino_nb.fast.cache`).
* ``gpu`` (``--gpu-augment``): the CPU only decodes and resizes (or reads the cache); crops and
  colour operations run batched on the device (:mod:`dino_nb.fast.crops`).
"""

from __future__ import annotations

import torch

from ..augment import DataAugmentation
from ..config import TrainConfig
from ..datasets import DatasetBundle
from ..distributed import DistInfo
from ..loader import PipelineParts, SeededDataset, register_crop_pipeline
from .cache import CachedCanvases, MultiCropCollate, WithSeeds
from .crops import DecodeResize, GPUMultiCrop


def _canvas(cfg: TrainConfig) -> int:
    """Side of the square canvas crops are cut from (by default evaluation's resize)."""
    return cfg.canvas_size or round(cfg.global_size * 256 / 224)


def _cached(cfg: TrainConfig, bundle: DatasetBundle, info: DistInfo) -> CachedCanvases:
    """The pixel cache of the train set; rank 0 builds it, the other ranks open it."""
    if info.enabled:
        if info.is_main:
            CachedCanvases(bundle.train_plain, _canvas(cfg), progress=cfg.progress)
        torch.distributed.barrier()
    return CachedCanvases(bundle.train_plain, _canvas(cfg), progress=cfg.progress and info.is_main)


def cache_pipeline(
    cfg: TrainConfig, bundle: DatasetBundle, augmentation: DataAugmentation, info: DistInfo
) -> PipelineParts:
    """Canvases from the pixel cache; each worker cuts its batch's crops as tensors."""
    return WithSeeds(_cached(cfg, bundle, info)), MultiCropCollate(augmentation), None


def gpu_pipeline(
    cfg: TrainConfig, bundle: DatasetBundle, augmentation: DataAugmentation, info: DistInfo
) -> PipelineParts:
    """Canvases (from the cache, or decoded and resized by the workers); crops on the device."""
    if cfg.cache_pixels:
        canvases = SeededDataset(_cached(cfg, bundle, info))
    else:
        canvases = SeededDataset(bundle.train_plain.with_transform(DecodeResize(_canvas(cfg))))
    return canvases, None, GPUMultiCrop.from_augmentation(augmentation)


register_crop_pipeline("cache", cache_pipeline)
register_crop_pipeline("gpu", gpu_pipeline)
