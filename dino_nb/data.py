"""Datasets and loaders: ImageFolder datasets (ImageNette or the built-in one) and the
loaders the training loop and the evaluation use."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .synthetic import ensure_builtin_dataset

#: ``--data`` value that selects the generated dataset.
BUILTIN = "builtin"


def rgb_loader(path: str) -> Image.Image:
    """Open an image file and convert it to RGB (ImageNette holds grayscale and CMYK JPEGs)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def plain_transform(size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation transform: resize the short side, centre crop, then normalise.

    The resize keeps the usual 256/224 ratio (a 224 crop from a 256 image). The tutorial
    normalised first and resized the normalised tensor afterwards; resizing first is the
    standard order and keeps the interpolation on pixel values.
    """
    return transforms.Compose(
        [
            transforms.Resize(int(round(size * 256 / 224)), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def resolve_data_root(data: str | os.PathLike | None) -> Path:
    """Turn a ``--data`` value into a folder holding ``train/`` and ``val/``.

    ``None`` or ``"builtin"`` selects the built-in dataset (generated on first use).

    Raises:
        FileNotFoundError: when the folder or its ``train``/``val`` subfolders are missing.
    """
    if data is None or str(data) == BUILTIN:
        return ensure_builtin_dataset()
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"data folder {root} has no {' or '.join(missing)} subfolder")
    return root


def image_folder(root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None) -> ImageFolder:
    """An ``ImageFolder`` that converts every image to RGB."""
    return ImageFolder(str(root), transform=transform, loader=rgb_loader)


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    """Raise ``ValueError`` naming the classes that only one of train and val holds."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"train and val hold different classes: only in train {only_train}, only in val {only_val}"
        )


def collate_crops(batch: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stack a batch of multi-crop samples into one tensor per crop.

    Returns:
        ``([crop_0 (B, 3, H0, W0), crop_1, ...], labels (B,))``.
    """
    n_crops = len(batch[0][0])
    crops = [torch.stack([sample[0][i] for sample in batch]) for i in range(n_crops)]
    labels = torch.tensor([sample[1] for sample in batch])
    return crops, labels


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    sampler: Any = None,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` with the options the project uses everywhere."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class DatasetBundle:
    """The three views of one dataset that training needs.

    Attributes:
        root: folder holding ``train/`` and ``val/``.
        train_aug: training images through the multi-crop augmentation.
        train_plain: training images through :func:`plain_transform` (kNN memory bank).
        val_plain: validation images through :func:`plain_transform`.
        classes: class folder names, the same for all three.
    """

    def __init__(self, root: Path, train_aug: ImageFolder, train_plain: ImageFolder, val_plain: ImageFolder) -> None:
        self.root = root
        self.train_aug = train_aug
        self.train_plain = train_plain
        self.val_plain = val_plain
        self.classes = list(train_plain.classes)


def build_datasets(
    data: str | os.PathLike | None,
    train_transform: Callable[[Image.Image], Any],
    eval_size: int,
    strict: bool = False,
) -> DatasetBundle:
    """Open ``train/`` and ``val/`` of a dataset for training and evaluation.

    Args:
        data: a folder, or ``None``/``"builtin"`` for the built-in dataset.
        train_transform: the multi-crop augmentation.
        eval_size: side of the centre crop for evaluation.
        strict: fail on unreadable images instead of skipping them with a warning.
    """
    root = resolve_data_root(data)
    plain = plain_transform(eval_size)
    train_plain = image_folder(root / "train", plain)
    val_plain = image_folder(root / "val", plain)
    check_same_classes(train_plain, val_plain)
    train_aug = image_folder(root / "train", train_transform)
    return DatasetBundle(root, train_aug, train_plain, val_plain)
