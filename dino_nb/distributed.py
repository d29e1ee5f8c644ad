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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``auto`` picks bf16 on GPUs that support it (Ampere and newer), fp16 on older ones
    (T4, P100, V100) and fp32 on the CPU.
    """
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --precision fp16 or auto")
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
