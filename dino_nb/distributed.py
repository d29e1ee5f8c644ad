"""Process-group set-up for ``torchrun``; one process needs no process group at all."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is running."""
        return self.world_size > 1


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively: the CPU, and CUDA GPUs of compute capability 8.0+.

    ``torch.cuda.is_bf16_supported()`` is not this question: it also answers True on a T4,
    P100 or V100 (compute capability 7.5, 6.0, 7.0), where bf16 is emulated and slow. The
    capability decides, as NVIDIA's Ampere (8.0) brought bf16 tensor cores.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``auto`` picks bf16 on GPUs with native bf16 (compute capability 8.0+: A100, L4, H100),
    fp16 with a loss scaler on older ones (T4, P100, V100) and fp32 on the CPU.
    """
    device = torch.device(device)
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision == "bf16" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"this GPU (compute capability {major}.{minor}) has no native bf16 (it needs 8.0+); "
            "use --precision fp16 or auto"
        )
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def launched_by_torchrun() -> bool:
    """``torchrun`` sets ``WORLD_SIZE`` and ``RANK`` for every process it starts."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(requested: str) -> torch.device:
    """Resolve ``"auto"``, ``"cpu"`` or ``"cuda"`` to a device, refusing CUDA where there is none."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for, but no CUDA GPU is available; use --device cpu"
        )
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return torch.device(requested)


def setup(requested_device: str) -> DistInfo:
    """Start the process group when launched by ``torchrun``; otherwise describe one process.

    NCCL is used on CUDA and gloo on CPU; each process takes the GPU of its local rank.
    """
    device = pick_device(requested_device)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(0, 1, 0, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def teardown(info: DistInfo) -> None:
    """Destroy the process group this module started."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes (itself where there is no process group)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
