"""One warmed-up training iteration, crops included, never makes the host wait for the device.

``torch.tensor(<list>, device="cuda")`` copies from pageable host memory, after which PyTorch
waits until the GPU has run everything queued; ``.item()``, ``.tolist()``, ``bool(t)`` and
``nonzero`` read device values back. Either one in every step stops the CPU from queueing
the next step while the GPU works. A CPU-only machine cannot see the wait, so these tests
count the calls instead: every Python entry point that makes a tensor from Python numbers
or reads one back is wrapped by a counter while a second iteration runs (the first may
build constants once per device). :class:`~dino_nb.fast.crops.GPUMultiCrop` runs the
branch it takes on an accelerator (on the CPU it may skip work by reading masks, as syncs
cost nothing there).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_loop import TINY  # the tiny ViT and run of the engine's tests

import dino_nb.fast.colour as colour
from dino_nb.loader import build_training_data
from dino_nb.sources import generate
from dino_nb.step import build_run, train_step
from dino_nb.tools.presets import preset

#: Frames in these folders are torch's own (e.g. AdamW reads its step count, a CPU tensor).
LIBRARIES = tuple(str(Path(m.__file__).parent) for m in (torch,))


def _from_python(data: object, *args: object, **kwargs: object) -> bool:
    return not isinstance(data, torch.Tensor)  # a list, a tuple, a number, an array


def _always(*args: object, **kwargs: object) -> bool:
    return True


#: (owner, name, which calls count): entry points that build from Python data or read back.
ENTRY_POINTS: list[tuple[object, str, Callable[..., bool]]] = [
    (torch, "tensor", _from_python),
    (torch, "as_tensor", _from_python),
    (torch.Tensor, "item", _always),
    (torch.Tensor, "tolist", _always),
    (torch.Tensor, "__bool__", _always),
    (torch.Tensor, "__int__", _always),
    (torch.Tensor, "__float__", _always),
    (torch.Tensor, "nonzero", _always),
    (torch, "nonzero", _always),
]


class HostSyncs:
    """Records ``"<entry point> at <file>:<line>"`` for every counted call while ``active``."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.active = False

    def wrap(self, name: str, original: Callable, counts: Callable[..., bool]) -> Callable:
        @functools.wraps(original)
        def counted(*args: object, **kwargs: object) -> object:
            if self.active and counts(*args, **kwargs):
                frame = sys._getframe(1)  # the caller
                where = frame.f_code.co_filename
                if not where.startswith(LIBRARIES):
                    self.calls.append(f"{name} at {where}:{frame.f_lineno}")
            return original(*args, **kwargs)

        return counted


@pytest.fixture
def host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostSyncs]:
    syncs = HostSyncs()
    for owner, name, counts in ENTRY_POINTS:
        monkeypatch.setattr(owner, name, syncs.wrap(name, getattr(owner, name), counts))
    # run GPUMultiCrop's accelerator branches (the CPU's skip work by reading masks)
    monkeypatch.setattr(colour, "_sync_is_free", lambda device: False)
    yield syncs


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate(root, n_train=4, n_val=2)  # 40 train images: 5 steps per epoch at batch 8
    return root


def test_the_counter_sees_python_data_and_reads(host_syncs: HostSyncs) -> None:
    host_syncs.active = True
    t = torch.tensor([1.0, 2.0])
    torch.as_tensor(t)  # from a tensor: not counted
    t.sum().item(), t.tolist(), bool(t[0]), t.nonzero()
    assert [c.split(" at ")[0] for c in host_syncs.calls] == [
        "tensor",
        "item",
        "tolist",
        "__bool__",
        "nonzero",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "crops_on, overrides",
    [
        ("uint8 crops from the loader", dict(koleo_weight=0.1)),
        (
            "GPUMultiCrop",
            dict(
                gpu_augment=True, teacher_centering="sinkhorn", koleo_weight=0.1, precision="bf16"
            ),
        ),
    ],
)
def test_a_warm_iteration_makes_no_tensor_from_python_data_and_reads_nothing_back(
    tiny_data: Path, tmp_path: Path, host_syncs: HostSyncs, crops_on: str, overrides: dict
) -> None:
    cfg = preset("cpu", data=str(tiny_data), out=str(tmp_path), **{**TINY, **overrides})
    data = build_training_data(cfg)
    run = build_run(cfg, steps_per_epoch=data.steps_per_epoch)
    batches = data.batches(0)
    for step in range(2):  # the first builds what is built once per device
        _, images = next(batches)  # the loader's work (CPU workers) is not counted
        host_syncs.active = step == 1
        crops = data.crops(images, step, run.device, cfg.seed)
        out = train_step(run, crops, run.schedules[step], signals=True)
        host_syncs.active = False
    assert torch.isfinite(out.loss) and "koleo" in out.signals
    assert host_syncs.calls == [], f"{crops_on}: {host_syncs.calls}"
