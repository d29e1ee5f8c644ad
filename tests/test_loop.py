"""The training engine end to end, on a tiny ViT and a tiny generated dataset (CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from dino_nb import checkpoint as ckpt_io
from dino_nb.distributed import DistInfo, resolve_precision
from dino_nb.loader import build_training_data
from dino_nb.loop import NonFiniteLossError, export_backbone, train
from dino_nb.loss import Loss
from dino_nb.model import student_teacher_from_config
from dino_nb.sources import generate
from dino_nb.step import build_run, seed_everything, train_step
from dino_nb.tools.presets import preset

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    model="vit_tiny_patch16_224",
    model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2},
    global_size=32,
    local_size=16,
    n_local_crops=2,
    batch_size=8,
    out_dim=64,
    hidden_dim=32,
    bottleneck_dim=16,
    epochs=2,
    warmup_epochs=1,
    eval_every=1000,
    eval_train_subset=40,
    log_every=1,
    save_every=1000,
    num_workers=0,
    progress=False,
    projector_size=0,
    drop_path_rate=0.1,
    momentum_teacher=0.996,  # the paper's schedule, cosine to 1
    momentum_teacher_end=1.0,
    minutes=None,
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate(root, n_train=4, n_val=2)  # 40 train, 20 val images: 5 steps per epoch at batch 8
    return root


def tiny_config(data: Path, out: Path, **overrides):
    return preset("cpu", data=str(data), out=str(out), **{**TINY, **overrides})


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_train_writes_run_folder_logs_and_schedules(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", projector_size=20)
    result = train(cfg)
    assert result.steps == 10 and not result.interrupted
    assert [s for s, _ in result.knn_history] == [0, 10]  # evaluated at the start and the end
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    step_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in step_lines] == list(range(1, 11))
    for key in ("lr", "wd", "momentum", "teacher_temp", "epoch", "images_per_s"):
        assert key in step_lines[0]
    for r in step_lines:  # collapse signals on every logged step, in nats
        assert 0.0 <= r["teacher_entropy"] <= math.log(TINY["out_dim"]) + 1e-4
        assert 0.0 <= r["batch_entropy"] <= math.log(TINY["out_dim"]) + 1e-4
        assert r["teacher_entropy"] <= r["batch_entropy"] + 1e-4  # entropy is concave
        assert r["kl"] >= -1e-5
    eval_lines = [r for r in records if "knn_top1" in r]
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in eval_lines)
    # schedules: lr warms up over the first epoch, weight decay grows, momentum grows
    lr = [r["lr"] for r in step_lines]
    assert lr[0] < lr[4]
    assert step_lines[0]["wd"] < step_lines[-1]["wd"]
    assert step_lines[0]["momentum"] < step_lines[-1]["momentum"]
    state = ckpt_io.load(result.checkpoint)
    assert state["step"] == 10 and set(state) >= {
        "student",
        "teacher",
        "optimizer",
        "scaler",
        "loss",
        "step",
        "epoch",
        "config",
        "rng",
    }
    assert (tmp_path / "run" / "config.json").is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "00010" / "embedding" / "projector_config.pbtxt").exists() or list(
        (tmp_path / "run").rglob("projector_config.pbtxt")
    )


def test_teacher_is_ema_of_student_and_never_optimised(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=3)
    state = ckpt_io.load(train(cfg).checkpoint)
    student, teacher = student_teacher_from_config(cfg)
    # the optimizer has one state entry per trainable student parameter, none for the teacher,
    # except the last layer's g and v: their gradients are cancelled during the first epoch
    n_trainable = sum(p.requires_grad for p in student.parameters())
    n_last_layer = sum(p.requires_grad for p in student.new_head.last_layer.parameters())
    assert n_last_layer == 2
    assert len(state["optimizer"]["state"]) == n_trainable - n_last_layer
    assert not any(p.requires_grad for p in teacher.parameters())
    # the teacher moved (EMA) but is not a copy of the student
    teacher.load_state_dict(state["teacher"])
    student.load_state_dict(state["student"])
    backbone_diffs = [
        not torch.equal(t, s)
        for (_, t), (_, s) in zip(
            teacher.backbone.named_parameters(), student.backbone.named_parameters(), strict=True
        )
    ]
    assert any(backbone_diffs)


def test_resume_is_exact(tiny_data: Path, tmp_path: Path) -> None:
    straight = train(
        tiny_config(tiny_data, tmp_path / "straight")
    )  # 10 steps, across an epoch boundary
    first = train(tiny_config(tiny_data, tmp_path / "split", max_steps=3))
    assert first.steps == 3
    second = train(tiny_config(tiny_data, tmp_path / "split"))  # resumes from split/checkpoint.pth
    assert second.steps == 10
    a, b = ckpt_io.load(straight.checkpoint), ckpt_io.load(second.checkpoint)
    for which in ("student", "teacher"):
        for key in a[which]:
            assert torch.equal(a[which][key], b[which][key]), f"{which} {key} differs after resume"
    assert torch.equal(a["loss"]["center"], b["loss"]["center"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_time_budget_fixes_the_step_count_and_resume_is_exact(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--minutes: a fake clock where each step takes 1 s; 1 minute fits 58 steps, resumed exactly."""
    import dino_nb.loop as train_module

    now = {"t": 0.0}
    original = train_module.train_step

    def one_second_step(*args, **kwargs):
        now["t"] += 1.0
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "clock", lambda: now["t"])
    monkeypatch.setattr(train_module, "train_step", one_second_step)
    # TimeBudget's defaults decide at 25% of the budget (step 15) and keep a 2% margin:
    # 15 + floor((0.98 * 60 - 15) / 1) = 58 steps; evaluations take 0 s on this clock
    straight = train(tiny_config(tiny_data, tmp_path / "straight", minutes=1.0))
    assert straight.steps == straight.total_steps == 58
    state = ckpt_io.load(straight.checkpoint)
    assert state["total_steps"] == 58 and state["schedule_fixed"]
    lr = [
        r["lr"]
        for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    ]
    assert (
        max(lr) == lr[int(round(58 * TINY["warmup_epochs"] / TINY["epochs"])) - 1]
    )  # warmup: half the run

    now["t"] = 0.0
    first = train(tiny_config(tiny_data, tmp_path / "split", minutes=1.0, max_steps=20))
    assert first.steps == 20 and first.total_steps == 58
    now["t"] = 0.0
    second = train(tiny_config(tiny_data, tmp_path / "split", minutes=1.0))
    assert second.steps == 58
    a, b = ckpt_io.load(straight.checkpoint), ckpt_io.load(second.checkpoint)
    for which in ("student", "teacher"):
        for key in a[which]:
            assert torch.equal(a[which][key], b[which][key]), f"{which} {key} differs after resume"
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_time_budget_holds_when_the_steps_get_slower(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Steps take 1 s until the count is fixed (58 in a minute), then 3 s: the run stops at the budget."""
    import dino_nb.loop as train_module

    now = {"t": 0.0, "steps": 0}
    original = train_module.train_step

    def slowing_step(*args, **kwargs):
        now["steps"] += 1
        now["t"] += 1.0 if now["steps"] <= 15 else 3.0
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "clock", lambda: now["t"])
    monkeypatch.setattr(train_module, "train_step", slowing_step)
    result = train(tiny_config(tiny_data, tmp_path / "run", minutes=1.0))
    assert result.total_steps == 58 and result.steps < 58
    assert now["t"] <= 60.0  # evaluations take no time on this clock
    assert result.steps == 15 + (60 - 15) // 3  # every step that fits, and no more
    assert "time budget reached at step 30 of 58" in capsys.readouterr().err
    assert ckpt_io.load(result.checkpoint)["step"] == result.steps


def test_resume_with_more_epochs_extends_the_run(tiny_data: Path, tmp_path: Path) -> None:
    """Without a budget, the schedules follow --epochs: resuming with more epochs trains on."""
    assert train(tiny_config(tiny_data, tmp_path / "run", epochs=1)).steps == 5
    longer = train(tiny_config(tiny_data, tmp_path / "run", epochs=2))
    assert longer.steps == longer.total_steps == 10


def test_resume_refuses_other_architecture(tiny_data: Path, tmp_path: Path) -> None:
    train(tiny_config(tiny_data, tmp_path / "run", max_steps=1))
    with pytest.raises(ValueError, match="out_dim"):
        train(tiny_config(tiny_data, tmp_path / "run", out_dim=32))


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", save_every=2)
    calls = {"n": 0}
    original = Loss.cross_entropy  # what the step calls once per batch

    def poisoned(self, student_output, targets):
        calls["n"] += 1
        loss = original(self, student_output, targets)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(Loss, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*--base-lr.*fp32"):
        train(cfg)
    state = ckpt_io.load(tmp_path / "run" / ckpt_io.LAST)
    assert state["step"] == 2  # the last good checkpoint, not the poisoned step
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_sigterm_saves_checkpoint_and_returns(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run")
    calls = {"n": 0}
    original = Loss.cross_entropy  # what the step calls once per batch

    def kill_at_step_3(self, student_output, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what Kaggle and Colab send
        return original(self, student_output, targets)

    monkeypatch.setattr(Loss, "cross_entropy", kill_at_step_3)
    result = train(cfg)
    assert result.interrupted and result.steps == 3
    assert ckpt_io.load(result.checkpoint)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_export_backbone_round_trip(tiny_data: Path, tmp_path: Path) -> None:
    result = train(tiny_config(tiny_data, tmp_path / "run", max_steps=2))
    path = export_backbone(result.checkpoint, tmp_path / "backbone.pth")
    state = torch.load(path, weights_only=True)
    model = timm.create_model(TINY["model"], num_classes=0, **TINY["model_kwargs"])
    missing, unexpected = model.load_state_dict(state)
    assert not missing and not unexpected
    teacher = ckpt_io.load(result.checkpoint)["teacher"]
    assert torch.equal(
        state["blocks.0.attn.qkv.weight"], teacher["backbone.blocks.0.attn.qkv.weight"]
    )


def test_best_model_is_the_best_evaluation_after_step_0(tiny_data: Path, tmp_path: Path) -> None:
    result = train(tiny_config(tiny_data, tmp_path / "run", eval_every=2))
    later = [(knn, step) for step, knn in result.knn_history if step > 0]
    assert len(later) == 5
    best = tmp_path / "run" / ckpt_io.BEST
    best_knn, best_step = max(later, key=lambda x: (x[0], -x[1]))  # the first of equal scores
    assert best.exists(), "best_model.pth is written at the first evaluation after step 0"
    state = ckpt_io.load(best)
    assert state["step"] == best_step and state["knn_top1"] == pytest.approx(best_knn)
    assert set(state) == {"student", "teacher", "config", "step", "knn_top1"}
    assert isinstance(state["teacher"], dict) and result.best_knn == pytest.approx(best_knn)


@pytest.mark.parametrize("use_bn_in_head", [False, True])
def test_train_step_is_what_train_runs(tiny_data: Path, tmp_path: Path, use_bn_in_head) -> None:
    """Three calls of the shipped train_step equal three steps of train(), bit for bit."""
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=3, use_bn_in_head=use_bn_in_head)
    state = ckpt_io.load(train(cfg).checkpoint)

    seed_everything(cfg.seed)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    data = build_training_data(cfg, info)
    run = build_run(cfg, info, data.steps_per_epoch)
    batches = data.batches(0)
    for step in range(3):
        _, images = next(batches)
        train_step(run, data.crops(images, step, run.device, cfg.seed), run.schedules[step])
    for which, module in (("student", run.student_module), ("teacher", run.teacher)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, state[which][key]), f"{which} {key}"
    assert torch.equal(run.loss.center, state["loss"]["center"])


@pytest.mark.parametrize("signals", [False, True])
def test_train_step_computes_the_teacher_targets_once(
    tiny_data: Path, tmp_path: Path, monkeypatch, signals
) -> None:
    """The loss reuses the targets the step took for its signals (Sinkhorn's are not free)."""
    cfg = tiny_config(tiny_data, tmp_path / "run", teacher_centering="sinkhorn")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    data = build_training_data(cfg, info)
    run = build_run(cfg, info, data.steps_per_epoch)
    calls = []
    original = type(run.loss).teacher_probs
    monkeypatch.setattr(
        type(run.loss), "teacher_probs", lambda self, t: calls.append(1) or original(self, t)
    )
    _, images = next(data.batches(0))
    out = train_step(
        run, data.crops(images, 0, run.device, cfg.seed), run.schedules[0], signals=signals
    )
    assert len(calls) == 1
    assert set(out.signals) == ({"teacher_entropy", "batch_entropy", "kl"} if signals else set())


def test_koleo_weight_moves_the_student_but_not_the_reported_loss(
    tiny_data: Path, tmp_path: Path
) -> None:
    """The step descends DINO + w * KoLeo of the two global views; it reports the DINO loss."""
    from dino_nb.loss import koleo_loss

    outs, students = {}, {}
    for weight in (0.0, 0.5):
        cfg = tiny_config(tiny_data, tmp_path / f"run{weight}", koleo_weight=weight)
        seed_everything(cfg.seed)
        info = DistInfo(0, 1, 0, torch.device("cpu"))
        data = build_training_data(cfg, info)
        run = build_run(cfg, info, data.steps_per_epoch)
        _, images = next(data.batches(0))
        crops = data.crops(images, 0, run.device, cfg.seed)
        with torch.no_grad():
            _, embeddings = run.student_module(crops, return_embeddings=True)
        by_hand = koleo_loss(embeddings[0]) + koleo_loss(embeddings[1])
        values = run.schedules[run.schedules.warmup_steps]  # past the warmup: lr > 0
        outs[weight] = train_step(run, crops, values, signals=True)
        students[weight] = run.student_module.state_dict()
    # same weights and crops: the same DINO loss (to float rounding), KoLeo not added to it
    assert torch.allclose(outs[0.0].loss, outs[0.5].loss, rtol=1e-6, atol=0)
    assert "koleo" not in outs[0.0].signals
    assert torch.allclose(outs[0.5].signals["koleo"], by_hand)
    moved = [k for k in students[0.0] if not torch.equal(students[0.0][k], students[0.5][k])]
    assert any(k.startswith("backbone.") for k in moved)


def test_teacher_head_batchnorm_uses_batch_statistics(tiny_data: Path, tmp_path: Path) -> None:
    """As in the official code, the teacher's head BatchNorm normalises by the batch (its
    running statistics move); its backbone stays in eval mode (no drop-path)."""
    cfg = tiny_config(tiny_data, tmp_path / "run", use_bn_in_head=True)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    data = build_training_data(cfg, info)
    run = build_run(cfg, info, data.steps_per_epoch)
    bn = [m for m in run.teacher.new_head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bn) == cfg.head_layers - 1 and all(m.training for m in bn)
    assert not run.teacher.backbone.training
    before = bn[0].running_mean.clone()
    _, images = next(data.batches(0))
    train_step(run, data.crops(images, 0, run.device, cfg.seed), run.schedules[0])
    assert not torch.equal(bn[0].running_mean, before)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"warmup_epochs": 5}, "warmup_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "fp16", "device": "cpu"}, "fp16 needs a GPU"),
        ({"resume": "/nonexistent/ckpt.pth"}, "checkpoint not found"),
        ({"batch_size": 64}, "fewer than one global batch"),
    ],
)
def test_contradictory_options_refused_before_work(
    tiny_data: Path, tmp_path: Path, overrides, message
) -> None:
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tiny_data, tmp_path / "run", **overrides))


def test_precision_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_precision("fp16", cpu)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dino_nb.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def write_tiny_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**TINY, **overrides}))
    return path


def test_cli_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "tiny.json")
    out = tmp_path / "run"
    proc = run_cli(
        "--preset",
        "cpu",
        "--config",
        str(config),
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--max-steps",
        "3",
        "-b",
        "8",
        "--momentum-teacher",
        "0.995",
        "-c",
        "4",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: 3 steps" in proc.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["momentum_teacher"] == 0.995 and saved["n_local_crops"] == 2


def test_cli_print_config_uses_preset_and_options() -> None:
    proc = run_cli(
        "--preset", "imagenette", "--print-config", "-o", "4096", "--teacher-temp", "0.05"
    )
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)  # stdout is the JSON alone: --config can read it back
    assert (
        cfg["out_dim"] == 4096
        and cfg["teacher_temp"] == 0.05
        and cfg["model"] == "vit_small_patch16_224"
    )
    # on stderr: what the preset changes (nothing here), then the options on top of it
    assert "preset 'imagenette'" in proc.stderr and "no changes" in proc.stderr
    tail = proc.stderr.split("on top of the preset:")[1].splitlines()
    assert [line.split() for line in tail[2:]] == [
        ["out_dim", "65536", "->", "4096"],
        ["teacher_temp", "0.07", "->", "0.05"],
    ]


def test_cli_print_config_gives_the_preset_s_reasons() -> None:
    from dino_nb.tools.presets import preset_changes

    proc = run_cli("--preset", "cpu-photos", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["koleo_weight"] == 0.1
    fields = [line.split()[0] for line in proc.stderr.splitlines() if "->" in line]
    for change in preset_changes("cpu-photos"):
        assert change.field in fields or change.field == "model_kwargs", change.field
        assert change.reason[:40] in proc.stderr, change.field  # the reasons are wrapped
    assert "model_kwargs.global_pool" in fields
    assert "nothing on top of the preset" in proc.stderr


def test_cli_bad_option_value_is_one_clear_error() -> None:
    proc = run_cli("--momentum-teacher", "high")
    assert proc.returncode == 2
    assert "--momentum-teacher: invalid float value: 'high'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_data_is_one_clear_error(tmp_path: Path) -> None:
    proc = run_cli(
        "--preset", "cpu", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nowhere" in lines[0]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- several processes


def torchrun(*args: str) -> list[str]:
    """The command that starts 2 processes of ``args`` under ``torchrun`` on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tiny_data: Path, tmp_path: Path) -> None:
    """2 processes x batch 4 follow the same loss curve as 1 process x batch 8."""
    config = write_tiny_config(tmp_path / "tiny.json", drop_path_rate=0.0)
    common = [
        "--preset",
        "cpu",
        "--config",
        str(config),
        "--data",
        str(tiny_data),
        "--max-steps",
        "4",
        "--no-progress",
    ]
    single = run_cli(*common, "--out", str(tmp_path / "one"), "-b", "8")
    assert single.returncode == 0, single.stderr
    proc = subprocess.run(
        torchrun("-m", "dino_nb.train", *common, "--out", str(tmp_path / "two"), "-b", "4"),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    # rank 0 alone wrote the run folder: one metrics file, one checkpoint
    assert ckpt_io.load(tmp_path / "two" / ckpt_io.LAST)["step"] == 4


def test_gpu_augment_path_runs_on_any_device(tiny_data: Path, tmp_path: Path) -> None:
    """--gpu-augment: the loader only decodes and resizes; crops are made on the device (here the CPU)."""
    assert train(tiny_config(tiny_data, tmp_path / "a", gpu_augment=True, max_steps=4)).steps == 4
    train(tiny_config(tiny_data, tmp_path / "b", gpu_augment=True, max_steps=4))
    train(tiny_config(tiny_data, tmp_path / "c", max_steps=4))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # seeded per step: reproducible
    assert losses(tmp_path / "a") != losses(tmp_path / "c")  # a different pipeline, not a no-op
    assert all(math.isfinite(x) for x in losses(tmp_path / "a"))


def test_pixel_cache_path_trains_reproducibly(tiny_data: Path, tmp_path: Path) -> None:
    """--cache-pixels: photos decoded once, batches augmented as tensors in the loader."""
    assert train(tiny_config(tiny_data, tmp_path / "a", cache_pixels=True, max_steps=4)).steps == 4
    assert list(tiny_data.glob(".dino_nb_cache/train-*.npy"))  # the cache sits beside train/
    train(tiny_config(tiny_data, tmp_path / "b", cache_pixels=True, max_steps=4))
    train(tiny_config(tiny_data, tmp_path / "c", max_steps=4))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
    assert all(math.isfinite(x) for x in losses(tmp_path / "a"))


def test_sinkhorn_centering_trains(tiny_data: Path, tmp_path: Path) -> None:
    """--teacher-centering sinkhorn: finite losses, a different run, and the center never used."""
    train(tiny_config(tiny_data, tmp_path / "a", teacher_centering="sinkhorn", max_steps=3))
    train(tiny_config(tiny_data, tmp_path / "b", max_steps=3))
    assert all(math.isfinite(x) for x in losses(tmp_path / "a"))
    assert losses(tmp_path / "a") != losses(tmp_path / "b")
    state = ckpt_io.load(tmp_path / "a" / "checkpoint.pth")
    assert not state["loss"]["center"].any()


def test_canvas_size_sets_the_cached_canvas(tiny_data: Path, tmp_path: Path) -> None:
    """--canvas-size: crops are cut from a larger canvas than evaluation's resize (37 px here)."""
    cfg = tiny_config(tiny_data, tmp_path / "run", cache_pixels=True, canvas_size=64)
    data = build_training_data(cfg)
    assert data.loader.dataset.dataset.canvas == 64
    cache = data.loader.dataset.dataset.path  # the file the loader reads
    assert cache.parent == tiny_data / ".dino_nb_cache" and cache.name.startswith("train-64px-")
    crops, _ = next(iter(data.loader))
    assert [tuple(c.shape[-2:]) for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 2


def test_unlabelled_nested_folder_trains_scores_views_and_resumes(
    tiny_data: Path, tmp_path: Path
) -> None:
    """train/ of the generated data, its class folders only nesting: no labels, 40 images."""
    photos = tiny_data / "train"
    first = train(tiny_config(photos, tmp_path / "run", max_steps=2, cache_pixels=True))
    assert first.steps == 2 and first.score == "view_agreement"
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in records if "view_agreement" in r]
    assert [r["step"] for r in evals] == [0, 2] and not any("knn_top1" in r for r in records)
    assert all(r["view_agreement_chance"] == 1 / 16 for r in evals)  # 16 images held aside
    assert all(0.0 <= r["view_agreement"] <= 1.0 for r in evals)
    assert all("batch_entropy" in r for r in records if "loss" in r)  # the collapse signals
    assert [s for s, _ in first.knn_history] == [0, 2]
    best = ckpt_io.load(tmp_path / "run" / ckpt_io.BEST)
    assert set(best) == {"student", "teacher", "config", "step", "view_agreement"}

    second = train(tiny_config(photos, tmp_path / "run", max_steps=4, cache_pixels=True))
    assert second.steps == 4 and [s for s, _ in second.knn_history] == [4]
    assert ckpt_io.load(second.checkpoint)["step"] == 4


def test_time_steps_counts_the_steps_after_the_warmup(tiny_data: Path, tmp_path: Path) -> None:
    """Each iteration reads the clock twice; the warm-up's (slow) iterations are left out."""
    from dino_nb.tools.timing import time_steps

    cfg = tiny_config(tiny_data, tmp_path / "run")
    readings = iter([0.0, 9.0, 10.0, 19.0] + [t for i in range(3) for t in (20.0 + i, 20.5 + i)])
    timing = time_steps(cfg, steps=3, warmup=2, clock=lambda: next(readings))
    assert timing.seconds == pytest.approx(0.5)
    steps_per_epoch = build_training_data(cfg).steps_per_epoch
    assert timing.steps_per_epoch == steps_per_epoch
    assert timing.epoch_seconds == pytest.approx(0.5 * steps_per_epoch)
    assert not (tmp_path / "run").exists()  # a throwaway run: nothing written
    with pytest.raises(ValueError, match="steps >= 1"):
        time_steps(cfg, steps=0)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves(
    tiny_data: Path, tmp_path: Path
) -> None:
    """``timeout`` or a platform signalling the whole group: the workers leave it to the main process."""
    import time

    config = write_tiny_config(tmp_path / "tiny.json", epochs=1000, num_workers=1)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dino_nb.train", "--preset", "cpu", "--config", str(config)]
        + ["--data", str(tiny_data), "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group, as under timeout or a terminal
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its loader worker
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 60 s of SIGTERM")
    assert proc.returncode == 143, stderr[-2000:]
    assert "checkpoint saved to" in stdout and "Traceback" not in stderr
    assert ckpt_io.load(out / ckpt_io.LAST)["step"] >= 3
