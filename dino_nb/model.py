"""Backbones from timm and the DINO student/teacher pair built on them."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .checkpoint import backbone_state_dict
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
        ``(student, teacher)``, both :class:`~dino_nb.model.MultiCropWrapper`.
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
    """The backbone of a :class:`~dino_nb.model.MultiCropWrapper` (student or teacher), else ``model``."""
    return model.backbone if isinstance(model, MultiCropWrapper) else model


def backbone_from_checkpoint(
    path: str, which: str = "teacher", map_location: str = "cpu"
) -> nn.Module:
    """Rebuild the backbone saved in a training checkpoint (``checkpoint.pth`` or ``best_model.pth``).

    Args:
        path: checkpoint written by :func:`dino_nb.loop.train`.
        which: ``"teacher"`` (the paper evaluates the teacher) or ``"student"``.
        map_location: device to load the tensors on.

    Returns:
        the timm backbone in eval mode, with the checkpoint's weights.
    """
    state, cfg = backbone_state_dict(path, which, map_location)
    backbone = build_backbone(cfg["model"], False, **dict(cfg.get("model_kwargs") or {}))
    backbone.load_state_dict(state)
    return backbone.eval()


# --------------------------------------------------------------------------- head


class DINOHead(nn.Module):
    """Projection head put on the backbone's CLS embedding.

    ``x -> MLP -> L2-normalise -> weight-normalised Linear (no bias) -> logits``. The last
    layer is reparametrised as ``weight = g * v / ||v||`` (weight normalisation, one ``g``
    per output unit). With ``norm_last_layer`` the magnitudes ``g`` are fixed to 1 and
    frozen; the official code's help says leaving them free performs better but can make
    training unstable, and that its runs use ``False`` for ViT-S and ``True`` for ViT-B.

    Args:
        in_dim: dimension of the backbone embedding.
        out_dim: number of logits the softmax runs over (K in the paper, 65536 there).
        hidden_dim: width of the hidden MLP layers (2048 in the paper, 512 in the tutorial).
        bottleneck_dim: width of the layer before the last one (256 in the paper).
        n_layers: number of Linear layers in the MLP, at least 1.
        norm_last_layer: freeze the norm of the last layer's weight rows at 1.
        use_bn: a BatchNorm after each hidden Linear (the official ``use_bn_in_head``).
            It standardises every hidden feature over the batch, so the small differences
            between images that a freshly initialised backbone produces reach the softmax
            at full scale instead of drowning in what all images share. The teacher must
            then run its head in training mode (batch statistics), as the official code
            does; :func:`dino_nb.step.build_run` sees to that.

    Attributes:
        mlp: the multi-layer perceptron, ``(n_samples, in_dim) -> (n_samples, bottleneck_dim)``.
        last_layer: ``nn.Linear(bottleneck_dim, out_dim, bias=False)`` under the
            ``weight_norm`` parametrization: its parameters are
            ``last_layer.parametrizations.weight.original0`` (g, ``(out_dim, 1)``) and
            ``original1`` (v, ``(out_dim, bottleneck_dim)``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 512,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = False,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if n_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            for width_in in [in_dim] + [hidden_dim] * (n_layers - 2):
                layers.append(nn.Linear(width_in, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)

        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.weight_g.fill_(1.0)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            self.weight_g.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Truncated normal (std 0.02) weights and zero biases, as the official code does."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def weight_g(self) -> nn.Parameter:
        """Magnitude ``g`` of each output unit's weight row, shape ``(out_dim, 1)``."""
        return self.last_layer.parametrizations.weight.original0

    @property
    def weight_v(self) -> nn.Parameter:
        """Direction ``v`` of the last layer's weight, shape ``(out_dim, bottleneck_dim)``."""
        return self.last_layer.parametrizations.weight.original1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map embeddings ``(n_samples, in_dim)`` to logits ``(n_samples, out_dim)``."""
        x = self.mlp(x)  # (n_samples, bottleneck_dim)
        x = nn.functional.normalize(x, dim=-1, p=2)  # (n_samples, bottleneck_dim)
        return self.last_layer(x)  # (n_samples, out_dim)


#: The tutorial's name for :class:`DINOHead`.
Head = DINOHead


# --------------------------------------------------------------------------- multicrop


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
        new_head: the DINO :class:`~dino_nb.model.DINOHead` put on top.
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
