"""Backbones from timm and the DINO student/teacher pair built on them."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import timm
from torch import nn

from .head import DINOHead
from .multicrop import MultiCropWrapper

if TYPE_CHECKING:
    from .config import TrainConfig

#: Names that DINO users reach for; the tutorial's ``vit_deit_small_patch16_224`` is gone
#: from timm (it is ``deit_small_patch16_224`` now, and the paper's ViT-S/16 is
#: ``vit_small_patch16_224``).
SUGGESTED_MODELS = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_small_patch8_224",
    "vit_base_patch16_224",
    "deit_small_patch16_224",
)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    options = close or list(SUGGESTED_MODELS)
    return ", ".join(options)


def is_vit(backbone: nn.Module) -> bool:
    """Whether the backbone is a timm Vision Transformer (has patch embedding and blocks)."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")


def build_backbone(
    name: str = "vit_small_patch16_224", pretrained: bool = False, **timm_kwargs: Any
) -> nn.Module:
    """Create a timm model whose forward returns the pooled (CLS) embedding.

    The classifier is removed with ``num_classes=0``, so ``backbone(x)`` is
    ``(n_samples, backbone.num_features)``. Vision Transformers are built with
    ``dynamic_img_size=True`` unless told otherwise, so the same model takes 224 global
    and 96 local crops.

    Args:
        name: a timm model name, e.g. ``"vit_small_patch16_224"`` (the paper's ViT-S/16).
        pretrained: load timm's pretrained weights (needs the network).
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``,
            ``depth``, ``drop_path_rate``, ...).

    Raises:
        ValueError: for a name timm does not know, with close matches.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; did you mean one of: {_suggest(name)}?")
    kwargs = dict(timm_kwargs)
    if name.startswith(("vit_", "deit_", "test_vit")):
        kwargs.setdefault("dynamic_img_size", True)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise RuntimeError(
                f"could not load pretrained weights for {name!r} ({e}); "
                "check the network, or train from scratch without --pretrained"
            ) from e
        raise


def build_student_teacher(
    name: str,
    out_dim: int,
    *,
    pretrained: bool = False,
    hidden_dim: int = 512,
    bottleneck_dim: int = 256,
    head_layers: int = 3,
    norm_last_layer: bool = False,
    use_bn_in_head: bool = False,
    drop_path_rate: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Build the student and the teacher: same architecture, teacher a copy of the student.

    Drop-path regularises the student only (the paper); the teacher starts with exactly
    the student's weights and gets ``requires_grad=False`` on every parameter: it is
    updated by EMA, never by the optimizer. The keyword names are the
    :class:`~dino_nb.config.TrainConfig` fields they come from; a run's pair is
    :func:`student_teacher_from_config`.

    Args:
        name: timm model name.
        out_dim: K, the head's output dimension (number of prototypes).
        pretrained: start from timm's pretrained weights.
        hidden_dim: width of the head's MLP.
        bottleneck_dim: dimension before the head's last (weight-normalised) layer.
        head_layers: Linear layers in the head's MLP (the head's ``n_layers``).
        norm_last_layer: freeze the norm of the head's last layer at 1.
        use_bn_in_head: BatchNorm in the head's hidden layers (see :class:`DINOHead`).
        drop_path_rate: stochastic depth of the student's backbone.
        model_kwargs: extra ``timm.create_model`` keywords.

    Returns:
        ``(student, teacher)``, both :class:`~dino_nb.multicrop.MultiCropWrapper`.
    """
    model_kwargs = dict(model_kwargs or {})
    student_backbone = build_backbone(
        name, pretrained, drop_path_rate=drop_path_rate, **model_kwargs
    )
    teacher_backbone = build_backbone(name, pretrained, **model_kwargs)
    dim = student_backbone.num_features

    head_args = (dim, out_dim, hidden_dim, bottleneck_dim, head_layers)
    student = MultiCropWrapper(
        student_backbone,
        DINOHead(*head_args, norm_last_layer=norm_last_layer, use_bn=use_bn_in_head),
    )
    teacher = MultiCropWrapper(
        teacher_backbone,
        DINOHead(*head_args, norm_last_layer=norm_last_layer, use_bn=use_bn_in_head),
    )
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def student_teacher_from_config(cfg: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """:func:`build_student_teacher` with every argument taken from a run's configuration."""
    return build_student_teacher(
        cfg.model,
        cfg.out_dim,
        pretrained=cfg.pretrained,
        hidden_dim=cfg.hidden_dim,
        bottleneck_dim=cfg.bottleneck_dim,
        head_layers=cfg.head_layers,
        norm_last_layer=cfg.norm_last_layer,
        use_bn_in_head=cfg.use_bn_in_head,
        drop_path_rate=cfg.drop_path_rate,
        model_kwargs=cfg.model_kwargs,
    )


def unwrap_backbone(model: nn.Module) -> nn.Module:
    """The backbone of a :class:`~dino_nb.multicrop.MultiCropWrapper` (student or teacher), else ``model``."""
    return model.backbone if isinstance(model, MultiCropWrapper) else model


def backbone_from_checkpoint(
    path: str, which: str = "teacher", map_location: str = "cpu"
) -> nn.Module:
    """Rebuild the backbone saved in a training checkpoint (``checkpoint.pth`` or ``best_model.pth``).

    Args:
        path: checkpoint written by :func:`dino_nb.train.train`.
        which: ``"teacher"`` (the paper evaluates the teacher) or ``"student"``.
        map_location: device to load the tensors on.

    Returns:
        the timm backbone in eval mode, with the checkpoint's weights.
    """
    from .checkpoint import backbone_state_dict

    state, cfg = backbone_state_dict(path, which, map_location)
    backbone = build_backbone(cfg["model"], False, **dict(cfg.get("model_kwargs") or {}))
    backbone.load_state_dict(state)
    return backbone.eval()
