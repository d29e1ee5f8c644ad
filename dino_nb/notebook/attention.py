"""Self-attention maps of a ViT's last block: where the CLS token looks.

DINO's striking picture (Caron et al. 2021, Fig. 1 and Sec. 4.2.1) is the attention of
the ``[CLS]`` query to the patch tokens in the last block: without any label, some heads
attend to the main object. This module computes those maps for timm Vision Transformers.

timm's ``Attention`` uses ``F.scaled_dot_product_attention`` (``fused_attn=True``), which
never forms the attention matrix, so there is nothing to read off the module (timm's own
``AttentionExtract`` silently returns nothing then). Instead a forward pre-hook on the
last block's ``attn`` module captures its input ``x`` (already through ``norm1``) and
recomputes, outside the model,

    attn = softmax(q k^T * scale),   q, k = q_norm(W_q x), k_norm(W_k x)

exactly as the unfused branch of ``timm.layers.Attention.forward`` does. The model's
forward runs unchanged (no flag is flipped, nothing is patched), so its output is
identical with or without the maps being taken.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model import unwrap_backbone


def _last_attention(model: nn.Module) -> nn.Module:
    """The ``attn`` module of the last transformer block, checked to be timm's plain kind."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0 or not hasattr(blocks[-1], "attn"):
        raise ValueError(
            f"{type(model).__name__} is not a timm Vision Transformer (needs .blocks[-1].attn); "
            "attention maps need a ViT backbone"
        )
    attn = blocks[-1].attn
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    missing = [a for a in needed if not hasattr(attn, a)]
    if missing:
        raise ValueError(
            f"last block's attention {type(attn).__name__} lacks {missing}: only timm's "
            "standard Attention (timm.layers.Attention) is supported"
        )
    return attn


def patch_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Number of patch rows and columns the model makes of a ``height x width`` input.

    Uses the patch embedding's own rule (``dynamic_feat_size`` for models built with
    ``dynamic_img_size=True``, the fixed ``grid_size`` otherwise), never a hard-coded
    14 x 14.
    """
    patch_embed = model.patch_embed  # type: ignore[attr-defined]
    if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        gh, gw = patch_embed.dynamic_feat_size((height, width))
    else:
        gh, gw = patch_embed.grid_size
    return int(gh), int(gw)


def last_block_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Full self-attention matrices of the last block, every head, all tokens.

    Args:
        model: a timm ``VisionTransformer`` (any ``num_prefix_tokens``: CLS and register
            tokens) or a ``MultiCropWrapper`` around one, in whatever train/eval mode; it
            is run in eval mode and put back.
        images: ``(n_images, 3, H, W)`` normalised images on any device (moved to the
            model's device).

    Returns:
        ``(n_images, n_heads, n_tokens, n_tokens)`` float32 on CPU, rows summing to 1;
        token order is the model's: prefix tokens (CLS first, then registers), then the
        patches row by row.
    """
    from ..evaluation import inference  # evaluate imports scikit-learn: only when maps are taken

    model = unwrap_backbone(model)
    attn_module = _last_attention(model)
    if images.ndim != 4:
        raise ValueError(f"images must be (n_images, 3, H, W), got shape {tuple(images.shape)}")
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]  # (n_images, n_tokens, dim), after the block's norm1
        b, n, _ = x.shape
        qkv = (
            module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        )
        q, k, _v = qkv.unbind(0)  # each (n_images, n_heads, n_tokens, head_dim)
        q, k = module.q_norm(q).float(), module.k_norm(k).float()
        logits = (q * module.scale) @ k.transpose(-2, -1)  # (n_images, n_heads, n_tokens, n_tokens)
        captured.append(logits.softmax(dim=-1))

    handle = attn_module.register_forward_pre_hook(hook)
    try:
        with inference(model, autocast=False) as device:  # fp32: the maps are what is looked at
            model(images.to(device))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the last attention to run once, it ran {len(captured)} times")
    return captured[0].cpu()


def embeds_class_token(model: nn.Module) -> bool:
    """Whether the ViT's embedding is its ``[CLS]`` token (timm's ``global_pool="token"``).

    Only then is the ``[CLS]`` attention the one DINO trained; a model that averages its patch
    tokens (``global_pool="avg"``, the ``cpu-photos`` recipe) has a ``[CLS]`` token nothing
    reads.
    """
    model = unwrap_backbone(model)
    return getattr(model, "cls_token", None) is not None and model.global_pool == "token"


def cls_attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS query to each patch in the last block, one map per head.

    The rows of the full attention sum to 1 over all tokens; dropping the prefix tokens
    (CLS, registers) leaves maps that sum to slightly less than 1.

    Args:
        model: a timm ``VisionTransformer`` with a class token.
        images: ``(n_images, 3, H, W)`` normalised images.

    Returns:
        ``(n_images, n_heads, grid_h, grid_w)`` float32 on CPU.
    """
    model = unwrap_backbone(model)
    if getattr(model, "cls_token", None) is None:
        raise ValueError("the model has no class token, so there is no CLS attention to show")
    if not embeds_class_token(model):
        raise ValueError(
            f"the model's embedding pools its patch tokens (global_pool={model.global_pool!r}), "
            "not the [CLS] token: DINO never trained the [CLS] attention, so its maps mean nothing"
        )
    attn = last_block_attention(model, images)  # (n_images, n_heads, n_tokens, n_tokens)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    gh, gw = patch_grid(model, images.shape[-2], images.shape[-1])
    n_patches = attn.shape[-1] - n_prefix
    if n_patches != gh * gw:
        raise ValueError(
            f"{attn.shape[-1]} tokens minus {n_prefix} prefix tokens is {n_patches}, "
            f"not the {gh}x{gw} patch grid of a {images.shape[-2]}x{images.shape[-1]} input"
        )
    cls_row = attn[:, :, 0, n_prefix:]  # (n_images, n_heads, n_patches)
    return cls_row.reshape(attn.shape[0], attn.shape[1], gh, gw)


def threshold_mask(maps: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """The paper's mask: the fewest patches that hold ``threshold`` of each map's mass.

    Each map is normalised to sum 1; its values are sorted in decreasing order and kept
    until their cumulative sum reaches ``threshold`` (DINO keeps 60%, Sec. 4.2.1 and
    Fig. 3). The patch that crosses the threshold is kept, so the kept mass is always
    ``>= threshold``.

    Args:
        maps: ``(..., grid_h, grid_w)`` non-negative attention maps.
        threshold: fraction of the mass to keep, in (0, 1].

    Returns:
        boolean mask of the same shape as ``maps``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if maps.ndim < 2:
        raise ValueError(f"maps must be (..., grid_h, grid_w), got shape {tuple(maps.shape)}")
    flat = maps.float().flatten(-2)  # (..., n_patches)
    flat = flat / flat.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    values, order = flat.sort(dim=-1, descending=True)
    mass_before = values.cumsum(dim=-1) - values  # mass of the strictly larger patches
    keep_sorted = mass_before < threshold - 1e-6  # (..., n_patches)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize patch-level maps (or masks) to image size for overlays.

    Args:
        maps: ``(grid_h, grid_w)``, ``(n_heads, grid_h, grid_w)`` or
            ``(n_images, n_heads, grid_h, grid_w)``; booleans are accepted.
        size: ``(height, width)`` of the image.
        mode: ``"nearest"`` (shows the patches, as the paper's figures) or ``"bilinear"``.

    Returns:
        float32 maps of the same leading shape and spatial size ``size``.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    if not 2 <= maps.ndim <= 4:
        raise ValueError(f"maps must have 2 to 4 dimensions, got shape {tuple(maps.shape)}")
    lead = maps.shape[:-2]
    x = maps.float().reshape(1, math.prod(lead) if lead else 1, *maps.shape[-2:])
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(x, size=tuple(size), mode=mode, **kwargs)
    return out.reshape(*lead, *size)
