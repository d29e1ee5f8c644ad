"""The GPU paths, simulated on a CPU-only machine.

Each test stands for a first-day failure on a Kaggle or Colab GPU: a resume whose random
states land on the GPU, bf16 chosen on a card that only emulates it, an fp16 run that cannot
resume a bf16 checkpoint, workers and device-side crops chosen without regard to the machine,
TF32 left off, and a batch that does not fit. CUDA is simulated: a checkpoint loaded to the
``meta`` device, ``torch.cuda`` functions monkeypatched, an fp16 scaler on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_loop import tiny_config, tiny_data  # noqa: F401 - the fixture is used by name

import dino_nb.distributed as distributed
import dino_nb.loader as loader
import dino_nb.loop as train_module
from dino_nb import checkpoint as ckpt_io
from dino_nb.books import Logger
from dino_nb.distributed import DistInfo, allow_tf32, native_bf16, resolve_precision
from dino_nb.evaluation import autocast_dtype
from dino_nb.loader import decide_gpu_augment, default_num_workers
from dino_nb.loop import TrainResult, train
from dino_nb.model import student_teacher_from_config
from dino_nb.step import build_run
from dino_nb.tools import memory
from dino_nb.tools.memory import memory_estimate
from dino_nb.tools.presets import preset

CUDA = torch.device("cuda", 0)


# ----------------------------------------------------------------------------- resume


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_resume_loads_random_states_on_the_cpu_whatever_the_run_device(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A run on another device (``meta`` stands in for CUDA) resumes; RNG and AdamW steps stay on the CPU."""
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=2)
    train(cfg)
    torch.manual_seed(123)  # something else than what the checkpoint holds
    run = build_run(cfg, DistInfo(0, 1, 0, torch.device("meta")), steps_per_epoch=5)
    saved = train_module._checkpoint_to_resume(cfg, tmp_path / "run")
    assert saved is not None
    result = TrainResult(out_dir=tmp_path / "run")
    train_module._resume(run, cfg, *saved, result)
    assert result.steps == 2
    assert torch.equal(torch.get_rng_state(), saved[0]["rng"]["torch"])  # restored exactly
    steps = [s["step"] for s in run.optimizer.state_dict()["state"].values()]
    assert steps and all(s.device.type == "cpu" for s in steps)  # AdamW keeps its counters there


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 0), torch.float16),
        ((7, 5), torch.float16),
        ((8, 0), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_auto_precision_by_compute_capability(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: torch.dtype
) -> None:
    """P100/T4 get fp16 (+ scaler), A100/H100 bf16, although ``is_bf16_supported`` says True on all."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", CUDA) is expected
    assert autocast_dtype("cuda") is expected  # evaluation's autocast follows the same rule
    assert native_bf16(CUDA) is (expected is torch.bfloat16)
    if expected is torch.float16:
        with pytest.raises(ValueError, match=r"compute capability 7\.5|compute capability 6\.0"):
            resolve_precision("bf16", CUDA)
    else:
        assert resolve_precision("bf16", CUDA) is torch.bfloat16
    assert resolve_precision("fp16", CUDA) is torch.float16
    assert resolve_precision("fp32", CUDA) is None


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", torch.device("cpu"))


@pytest.mark.parametrize("saved_with", ["fp32", "bf16"])
def test_fp16_run_resumes_a_checkpoint_without_scaler_state(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
    saved_with: str,
) -> None:
    """A T4 (fp16, scaler on) resumes what a CPU or an A100 (bf16, scaler off) saved."""
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=2, precision=saved_with)
    train(cfg)
    state = ckpt_io.load(tmp_path / "run" / ckpt_io.LAST)
    assert state["scaler"] == {}  # the scaler was off
    run = build_run(tiny_config(tiny_data, tmp_path / "other"), steps_per_epoch=5)
    run.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what fp16 on a GPU builds
    run.load_checkpoint(state)
    assert run.scaler.is_enabled() and run.scaler.get_scale() == 2.0**16  # a fresh scaler
    # and the other way: an fp16 checkpoint (scaler state) into a run without a scaler
    run.scaler.scale(torch.ones((), requires_grad=True))  # the scaler now has state to save
    fp16_state = {**state, "scaler": run.scaler.state_dict()}
    bf16_run = build_run(tiny_config(tiny_data, tmp_path / "third"), steps_per_epoch=5)
    bf16_run.load_checkpoint(fp16_state)
    assert not bf16_run.scaler.is_enabled()


# ----------------------------------------------------------------------------- GPU defaults


def test_tf32_is_allowed_on_cuda_only() -> None:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        allow_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        allow_tf32(CUDA)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize(
    ("cores", "local_world", "expected"),
    [(2, 1, 1), (4, 1, 3), (16, 1, 8), (16, 2, 7), (8, 4, 1), (4, 2, 1)],
)
def test_loader_workers_share_the_cores_among_local_ranks(
    monkeypatch: pytest.MonkeyPatch, cores: int, local_world: int, expected: int
) -> None:
    """Colab (2 cores) 1 worker, Kaggle (4) 3, torchrun's ranks split the cores (one each kept)."""
    monkeypatch.setattr(loader, "_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert default_num_workers(CUDA) == expected
    assert default_num_workers(CUDA, local_world_size=local_world) == expected
    assert default_num_workers(torch.device("cpu")) == 1  # the CPU also runs the model


def test_gpu_augment_auto_where_the_cpu_cannot_feed_the_gpu() -> None:
    cfg = preset("t4")
    assert cfg.gpu_augment == "auto"
    assert decide_gpu_augment(cfg, CUDA, workers=1)[0]  # Colab
    assert decide_gpu_augment(cfg, CUDA, workers=3)[0]  # Kaggle
    assert decide_gpu_augment(cfg, CUDA, workers=12)[0]  # 12 x 80 images/s < 1000
    on, reason = decide_gpu_augment(cfg, CUDA, workers=13)
    assert not on and "13 loader workers" in reason
    assert not decide_gpu_augment(cfg, torch.device("cpu"), workers=1)[0]
    forced = preset("t4", gpu_augment=False)
    assert decide_gpu_augment(forced, CUDA, workers=1) == (False, "--gpu-augment off as asked")
    assert decide_gpu_augment(preset("t4", gpu_augment=True), torch.device("cpu"), 1)[0]


def test_gpu_augment_decision_is_kept_by_a_resume(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Decided once, printed once with the reason; a resumed run keeps the saved decision."""
    monkeypatch.setattr(loader, "_cores", lambda: 2)
    info = DistInfo(0, 1, 0, CUDA)
    fresh = train_module._decide_data_path(preset("t4"), info, saved=None)
    assert fresh.gpu_augment is True
    assert "data: crops on the GPU" in capsys.readouterr().out
    saved = {**preset("t4").to_dict(), "gpu_augment": False}  # decided on a bigger machine
    resumed = train_module._decide_data_path(preset("t4"), info, saved=saved)
    assert resumed.gpu_augment is False
    assert "as the run being resumed decided" in capsys.readouterr().out
    asked = train_module._decide_data_path(preset("t4", gpu_augment=True), info, saved=saved)
    assert asked.gpu_augment is True  # an explicit choice wins


def test_build_training_data_decides_auto_itself(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """Notebooks and benchmarks call ``build_training_data`` with ``auto``: off on the CPU."""
    data = loader.build_training_data(tiny_config(tiny_data, tmp_path / "run"))
    assert data.gpu_aug is None


def test_memory_estimate_counts_the_parameters_exactly() -> None:
    cfg = preset("t4")
    student, _ = student_teacher_from_config(cfg)
    n = sum(p.numel() for p in student.parameters())
    half = memory_estimate(cfg, torch.float16)
    assert half.parameters == n
    assert half.state_bytes == 20 * n  # student fp32 weights, grads, 2 moments; teacher weights
    full = memory_estimate(cfg, None)
    assert full.activation_bytes > 1.8 * half.activation_bytes  # fp32 activations twice the size
    double = memory_estimate(preset("t4", batch_size=256), torch.float16)
    assert double.activation_bytes == 2 * half.activation_bytes
    assert 2 * 2**30 < half.total_bytes < 14 * 2**30  # the t4 preset fits a 15 GiB T4


def test_memory_estimate_warns_when_the_batch_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    class Props:
        total_memory = 8 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    line = memory_estimate(preset("imagenette"), None, CUDA).describe()
    assert "of the device's 8.0 GiB" in line and "try --batch-size 32" in line
    fits = memory_estimate(preset("t4", batch_size=16), torch.float16, CUDA).describe()
    assert "try --batch-size" not in fits


def test_agree_sums_over_ranks_and_is_the_identity_for_one_process() -> None:
    assert distributed.agree([1, 0, 58, 1], DistInfo(0, 1, 0, torch.device("cpu"))) == [1, 0, 58, 1]


def test_each_rank_saves_and_restores_its_own_cuda_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torchrun, rank 1 (cuda:1) saves cuda:1's state and restores it to cuda:1, not all devices."""
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}

    def get_state(device="cuda"):
        return states[torch.device(device).index]

    def set_state(state, device="cuda"):
        restored[torch.device(device).index] = state.device.type, int(state[0])

    def set_all(_):
        raise AssertionError("set_rng_state_all would give every device one rank's states")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    saved = ckpt_io.rng_state(torch.device("cuda", 1))
    assert int(saved["cuda"][0]) == 1
    ckpt_io.set_rng_state(saved, torch.device("cuda", 1))
    assert restored == {1: ("cpu", 1)}


def test_the_memory_line_says_when_the_estimate_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The estimate is advice: a backbone it cannot measure gives a line, not an error."""
    cfg = preset("t4", batch_size=8, precision="fp32")
    assert memory.memory_line(cfg).startswith("memory estimate at batch 8 (fp32)")

    def broken(*args, **kwargs):
        raise AttributeError("this backbone has no blocks")

    monkeypatch.setattr(memory, "memory_estimate", broken)
    assert "memory estimate unavailable (AttributeError" in memory.memory_line(cfg)


def test_the_memory_estimate_has_a_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``python -m dino_nb.tools.memory --preset t4 --batch-size 256``: the line, for a T4 here too."""

    class Props:
        total_memory = 12 * 2**30

    assert memory.main(["--preset", "t4", "--batch-size", "256", "--precision", "fp16"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("memory estimate at batch 256 (fp16)") and "device" not in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))  # a T4
    assert memory.main(["--preset", "t4", "--batch-size", "256"]) == 0
    line = capsys.readouterr().out
    assert (
        "(fp16)" in line
        and "of the device's 12.0 GiB; likely too much: try --batch-size 128" in line
    )


def test_a_run_prints_no_estimate_but_the_memory_its_first_step_took(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The loop measures (the estimate lives in tools/, which the core does not import)."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    run = SimpleNamespace(info=SimpleNamespace(is_main=True), device=CUDA)
    logger = SimpleNamespace(enabled=True, run=run)
    bar = SimpleNamespace(write=print)
    Logger.peak_memory(logger, bar)  # type: ignore[arg-type]
    assert capsys.readouterr().out == "peak GPU memory after the first step: 3.0 GiB\n"
    logger.enabled = False  # rank 1 says nothing
    Logger.peak_memory(logger, bar)  # type: ignore[arg-type]
    assert capsys.readouterr().out == ""
