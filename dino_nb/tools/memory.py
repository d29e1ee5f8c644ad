"""How much GPU memory a run needs, estimated before its first step.

A Kaggle or Colab user learns that a batch does not fit only when CUDA runs out of memory,
minutes into a session. :func:`memory_estimate` says it before the first step, from

* the exact bytes of what lives for the whole run: the student's fp32 weights, gradients
  and AdamW's two moments (16 bytes per parameter) and the teacher's weights (4 bytes), the
  parameters counted on a model built on the ``meta`` device (no memory, no time; on the CPU
  where an older timm cannot build on ``meta``);
* an estimate of the activations the student keeps for its backward pass: per transformer
  block about ``34 * tokens * width`` bytes per image in 16-bit precision (Korthikanti et
  al. 2022, "Reducing Activation Recomputation in Large Transformer Models", without their
  attention-score term: PyTorch's fused attention does not store the score matrix), twice
  that in fp32, summed over every crop; plus the head's hidden and output activations.

The teacher runs without gradients, so it keeps no activations. The training loop prints
the measured peak after the first step on a GPU; before a run,
``python -m dino_nb.tools.memory --preset t4 --batch-size 256`` (the training command's
options) prints the estimate, and :func:`memory_line` gives it to a notebook.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from ..config import TrainConfig
from ..distributed import pick_device, resolve_precision
from ..model import student_teacher_from_config
from .cli import config_from_args

GIB = 2**30
#: The autocast dtype of an explicit ``--precision`` (``auto`` depends on the device).
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Bytes of activations per token, per unit of width, per block, in 16-bit (Korthikanti et al.).
ACTIVATION_BYTES_16BIT = 34


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on its device.

    Attributes:
        parameters: the student's parameters (the teacher has as many).
        state_bytes: weights, gradients and optimizer moments (exact).
        activation_bytes: what the student's forward keeps for backward (estimate).
        batch_size: images per step per process.
        dtype: the autocast dtype, ``None`` for fp32.
        device_bytes: the device's memory, where known.
    """

    parameters: int
    state_bytes: int
    activation_bytes: int
    batch_size: int
    dtype: torch.dtype | None
    device_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        """State plus activations."""
        return self.state_bytes + self.activation_bytes

    def describe(self) -> str:
        """One line for the log: the parts, the total and, on a GPU, whether it fits."""
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            self.dtype, str(self.dtype)
        )
        line = (
            f"memory estimate at batch {self.batch_size} ({precision}): weights, gradients and "
            f"AdamW state {self.state_bytes / GIB:.1f} GiB (exact) + activations "
            f"~{self.activation_bytes / GIB:.1f} GiB = ~{self.total_bytes / GIB:.1f} GiB"
        )
        if self.device_bytes:
            line += f" of the device's {self.device_bytes / GIB:.1f} GiB"
            if self.total_bytes > 0.95 * self.device_bytes:
                line += f"; likely too much: try --batch-size {max(1, self.batch_size // 2)}"
        return line


def memory_estimate(
    cfg: TrainConfig, dtype: torch.dtype | None, device: torch.device | str | None = None
) -> MemoryEstimate:
    """Estimate the memory of ``cfg``'s training step at ``cfg.batch_size`` (see the module doc).

    Args:
        cfg: the run's configuration (model, head, crops, batch).
        dtype: the autocast dtype (``None``: fp32, activations twice as large).
        device: a CUDA device whose total memory the estimate is compared with.
    """
    shapes_only = replace(cfg, pretrained=False)  # no weights to fetch
    try:
        with torch.device("meta"):  # no memory, no time
            student, _ = student_teacher_from_config(shapes_only)
    except (NotImplementedError, RuntimeError):  # older timm reads a value while initialising
        student, _ = student_teacher_from_config(shapes_only)
    parameters = sum(p.numel() for p in student.parameters())
    state_bytes = parameters * (4 + 4 + 8) + parameters * 4  # student w, grad, 2 moments; teacher w

    backbone = student.backbone
    width = int(getattr(backbone, "embed_dim", 0) or getattr(backbone, "num_features", 0))
    blocks = len(getattr(backbone, "blocks", ())) or 1
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", (16, 16))
    patch = patch[0] if isinstance(patch, tuple | list) else int(patch)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.n_local_crops
    tokens = sum((size // patch) ** 2 + prefix for size in sizes)  # per image, all crops
    per_value = ACTIVATION_BYTES_16BIT * (1 if dtype in (torch.float16, torch.bfloat16) else 2)
    backbone_bytes = per_value * tokens * width * blocks
    head_values = 4 * cfg.hidden_dim + cfg.bottleneck_dim + 3 * cfg.out_dim  # per crop image
    head_bytes = 4 * head_values * len(sizes)  # the head's outputs and the loss run in fp32
    activation_bytes = cfg.batch_size * (backbone_bytes + head_bytes)

    device_bytes = None
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        device_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return MemoryEstimate(
        parameters, state_bytes, activation_bytes, cfg.batch_size, dtype, device_bytes
    )


def memory_line(cfg: TrainConfig, device: torch.device | str | None = None) -> str:
    """The estimate's line for ``cfg`` on ``device``, at the precision the run would use there.

    An explicit ``cfg.precision`` is taken as it is (``fp16`` gives a T4's figure on any
    machine); ``auto`` is resolved for ``device``. An estimate that fails (a backbone of
    another shape) says so in the line instead of raising: it is advice, and must not stop
    what asked for it.

    Args:
        cfg: the run's configuration.
        device: where the run will train; default the device ``cfg.device`` picks here.
    """
    device = pick_device(cfg.device) if device is None else torch.device(device)
    try:
        auto = cfg.precision == "auto"
        dtype = resolve_precision(cfg.precision, device) if auto else DTYPES[cfg.precision]
        return memory_estimate(cfg, dtype, device).describe()
    except Exception as e:  # noqa: BLE001 - any model timm builds; the estimate is advice only
        return f"memory estimate unavailable ({type(e).__name__}: {e})"


def main(argv: list[str] | None = None) -> int:
    """``python -m dino_nb.tools.memory [training options]``: print the run's memory estimate."""
    try:
        cfg = config_from_args(argv).config
        print(memory_line(cfg))
    except ValueError as e:  # e.g. --device cuda without a GPU
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
