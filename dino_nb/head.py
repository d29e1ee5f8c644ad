"""The DINO projection head: MLP, L2-normalised bottleneck, weight-normalised last layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


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
            does; :func:`dino_nb.engine.build_run` sees to that.

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
