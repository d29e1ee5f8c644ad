"""Run a backbone and a head over a list of crops of different resolutions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Split crop indices into runs of consecutive crops with the same spatial size.

    Returns:
        ``[(start, end), ...]`` half-open index ranges, in order.
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops, one backbone pass per resolution.

    Crops of the same size (the 2 global ones, then the local ones) are concatenated along
    the batch dimension and go through the backbone together; the head then runs once on
    all embeddings, and the logits are split back per crop. With a timm ViT built with
    ``dynamic_img_size=True``, global crops at 224 and local crops at 96 both work.

    Args:
        backbone: a module mapping ``(n, 3, H, W)`` to ``(n, in_dim)``; a timm model built
            with ``num_classes=0``. A timm model that still has a classifier gets it
            removed with ``reset_classifier(0)``, as the tutorial replaced its ``head``.
        new_head: the DINO :class:`~dino_nb.head.DINOHead` put on top.
    """

    def __init__(self, backbone: nn.Module, new_head: nn.Module) -> None:
        super().__init__()
        if getattr(backbone, "num_classes", 0) and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.new_head = new_head

    def forward(
        self, x: Sequence[torch.Tensor] | torch.Tensor, return_embeddings: bool = False
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Run every crop through backbone and head.

        Args:
            x: list of ``n_crops`` tensors, each ``(n_samples, 3, size_i, size_i)``; a single
                tensor counts as one crop.
            return_embeddings: also return the backbone's embeddings (what the head reads;
                the KoLeo regulariser spreads them).

        Returns:
            tuple of ``n_crops`` tensors, each ``(n_samples, out_dim)``; with
            ``return_embeddings``, ``(logits, embeddings)``, the embeddings ``n_crops`` tensors
            of ``(n_samples, embed_dim)``.
        """
        if isinstance(x, torch.Tensor):
            x = [x]
        n_samples = x[0].shape[0]
        if any(c.shape[0] != n_samples for c in x):
            raise ValueError(
                f"all crops must hold the same number of samples, got {[c.shape[0] for c in x]}"
            )
        embeddings = [
            self.backbone(torch.cat(list(x[start:end]), dim=0))  # (n_samples * group_size, in_dim)
            for start, end in resolution_groups(x)
        ]
        features = torch.cat(embeddings, dim=0)  # (n_samples * n_crops, embed_dim)
        logits = self.new_head(features)  # (n_samples * n_crops, out_dim)
        if return_embeddings:
            return logits.chunk(len(x)), features.chunk(len(x))
        return logits.chunk(len(x))  # n_crops x (n_samples, out_dim)
