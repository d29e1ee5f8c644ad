"""Process-group set-up for ``torchrun``; one process needs no process group at all.

Besides the group the gradients travel in (NCCL on GPUs), every multi-process run has a
small gloo group on the CPU for the loop's decisions (:func:`agree`): whether to stop (a
signal seen by one rank, the time budget running out) and how many steps the budget
allows. Those are host integers; agreeing on them over gloo never waits for a GPU, and
every rank leaves the loop at the same step, so no rank waits forever in a collective the
others never enter.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .config import Device, Precision, TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    #: the gloo group of :func:`agree` (``None``: the default group, already gloo, or one process)
    control: Any = field(default=None, compare=False, repr=False)

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
    if precision not in typing.get_args(Precision):
        raise ValueError(
            f"unknown precision {precision!r}; use {', '.join(typing.get_args(Precision))}"
        )
    if precision == "fp32":
        return None
    if device.type == "cpu":  # also where device "auto" found no GPU, which validate cannot know
        if precision == "fp16":
            raise ValueError(
                "precision fp16 needs a GPU, and this run is on the CPU; use fp32 or bf16"
            )
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
    if requested not in typing.get_args(Device):
        raise ValueError(f"unknown device {requested!r}; use {', '.join(typing.get_args(Device))}")
    return torch.device(requested)


def setup(requested_device: str) -> DistInfo:
    """Start the process group when launched by ``torchrun``; otherwise describe one process.

    NCCL is used on CUDA and gloo on CPU; each process takes the GPU of its local rank. On
    CUDA a second, gloo group carries the loop's decisions (:func:`agree`).
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
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistInfo(rank, world, local_rank, device, control)


def teardown(info: DistInfo) -> None:
    """Destroy the process group this module started."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def agree(values: Sequence[int], info: DistInfo) -> list[int]:
    """Element-wise sum over all ranks of a few host integers (themselves for one process).

    The loop's decisions go through here so that every rank takes the same one: a flag
    that any rank raises (sum > 0), a number that only rank 0 knows (the others add 0).
    One all-reduce over the CPU group: nothing waits for a GPU.
    """
    if not info.enabled:
        return list(values)
    summed = torch.tensor(list(values), dtype=torch.int64)  # (n,) on the CPU
    dist.all_reduce(summed, group=info.control)
    return summed.tolist()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process); over the CPU group."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj, group=info.control)
    return gathered


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (e.g. before exiting: rank 0 may still be saving)."""
    if info.enabled:
        dist.barrier(group=info.control)


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matrix products and convolutions use TF32 tensor cores (Ampere and newer).

    PyTorch leaves fp32 matmuls in full fp32 by default; ``--precision fp32`` (the advice
    after a NaN) then runs several times slower on an A100/H100 than it needs to. TF32 keeps
    fp32's range with a 10-bit mantissa, which training tolerates (NVIDIA enables it by
    default in its own containers). Nothing changes on the CPU.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes (itself where there is no process group)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def single_process(cfg: TrainConfig) -> DistInfo:
    """One process on ``cfg.device``: what a notebook or a benchmark runs as."""
    return DistInfo(0, 1, 0, pick_device(cfg.device))
