"""The loop's records: evaluation and best model, checkpoints, logs, the collapse monitor."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_loop import TINY

import dino_nb.books as books
from dino_nb import checkpoint as ckpt_io
from dino_nb.books import Checkpoints, CollapseMonitor, Evaluation, Logger, write_projector
from dino_nb.budget import Budget, Decision
from dino_nb.step import build_run
from dino_nb.tools.presets import preset

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- evaluation


class ScriptedEvaluator:
    """Stands for the kNN evaluator: returns the next score of a script."""

    score_key = "knn_top1"

    def __init__(self, scores: list[float]) -> None:
        self.scores = iter(scores)

    def __call__(self, backbone: torch.nn.Module) -> dict[str, float]:
        return {"knn_top1": next(self.scores)}


@pytest.fixture
def tiny_run(tmp_path: Path):
    cfg = preset("cpu", out=str(tmp_path), **{**TINY, "eval_every": 2, "save_every": 3})
    return build_run(cfg, steps_per_epoch=5)


def evaluation_of(run, out_dir: Path, scores: list[float], monkeypatch, best: float = 0.0):
    monkeypatch.setattr(books, "make_evaluator", lambda *args: ScriptedEvaluator(scores))
    data = SimpleNamespace(bundle=None, loader=SimpleNamespace(num_workers=0, pin_memory=False))
    logger = Logger(run, out_dir)
    return Evaluation(run, data, logger, Budget(run, None), best=best), logger


def test_best_model_is_written_only_when_the_score_improves_after_step_0(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = [0.5, 0.3, 0.6, 0.6, 0.4]  # at steps 0, 2, 4, 6, 8
    evaluation, logger = evaluation_of(tiny_run, tmp_path, scores, monkeypatch)
    best = tmp_path / ckpt_io.BEST
    written = []
    for step in range(0, 10, 2):
        evaluation.evaluate(step)
        written.append(ckpt_io.load(best)["step"] if best.exists() else None)
        best.unlink(missing_ok=True)
    logger.close()
    assert written == [None, 2, 4, None, None]  # step 0 is the random init; ties keep the first
    assert evaluation.best == 0.6
    assert evaluation.history == list(zip(range(0, 10, 2), scores, strict=True))


def test_a_resumed_run_keeps_its_best_score(tiny_run, tmp_path: Path, monkeypatch) -> None:
    evaluation, logger = evaluation_of(tiny_run, tmp_path, [0.6, 0.8], monkeypatch, best=0.7)
    evaluation.evaluate(5)
    assert not (tmp_path / ckpt_io.BEST).exists() and evaluation.best == 0.7
    evaluation.evaluate(6)
    logger.close()
    assert ckpt_io.load(tmp_path / ckpt_io.BEST)["knn_top1"] == pytest.approx(0.8)


def test_evaluations_and_saves_are_due_on_their_cadence_but_not_at_the_end(
    tiny_run, tmp_path: Path, monkeypatch
) -> None:
    """eval_every=2; save_every=3 and each epoch's end (5 steps); the last step has its own."""
    evaluation, logger = evaluation_of(tiny_run, tmp_path, [], monkeypatch)
    checkpoints = Checkpoints(tiny_run, tmp_path, evaluation, Budget(tiny_run, None))
    going = Decision(last_step=10)
    assert [s for s in range(1, 11) if evaluation.due(s, going)] == [2, 4, 6, 8]
    assert [s for s in range(1, 11) if checkpoints.due(s, going)] == [3, 5, 6, 9]
    stopping = Decision(last_step=10, stop="signal")  # the final evaluation and save follow
    assert not evaluation.due(4, stopping) and not checkpoints.due(6, stopping)
    logger.close()


def test_a_checkpoint_holds_the_best_score_and_the_step_count(
    tiny_run, tmp_path: Path, monkeypatch
) -> None:
    evaluation, logger = evaluation_of(tiny_run, tmp_path, [0.4], monkeypatch)
    evaluation.evaluate(3)
    Checkpoints(tiny_run, tmp_path, evaluation, Budget(tiny_run, None)).save(3)
    logger.close()
    state = ckpt_io.load(tmp_path / ckpt_io.LAST)
    assert state["best_knn"] == pytest.approx(0.4) and state["step"] == 3
    assert state["total_steps"] == 10 and state["schedule_fixed"] is True
    assert len(state["rng_by_rank"]) == 1 and state["rng"] == state["rng_by_rank"][0]


def test_the_loop_imports_only_the_core() -> None:
    """train, books and budget reach no subpackage (notebook, fast, tools), not even lazily."""
    spec = importlib.util.spec_from_file_location("package_map", REPO / "scripts/package_map.py")
    package_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package_map)
    loop = {"dino_nb.loop", "dino_nb.books", "dino_nb.budget"}
    upward = [edge for edge in package_map.upward_imports(package_map.graph()) if edge[0] in loop]
    assert upward == []


# ----------------------------------------------------------------------------- projector


def test_write_projector(tmp_path):
    embs = torch.randn(6, 5)
    imgs = torch.rand(6, 3, 64, 64)
    labels = ["cat", "dog", "cat", "fish", "dog", "cat"]
    write_projector(tmp_path, embs, imgs, labels, step=3, tag="val")
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert "val:00003" in config and "sprite" in config
    folder = tmp_path / "00003" / "val"
    tensors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    assert np.allclose(tensors, embs.numpy(), atol=1e-4)
    assert (folder / "metadata.tsv").read_text().split() == labels
    sprite = Image.open(folder / "sprite.png")
    assert sprite.size[0] <= 3 * 48 and sprite.size[0] == sprite.size[1]


def test_write_projector_with_writer_denormalizes(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from dino_nb.augment import IMAGENET_MEAN, IMAGENET_STD

    # a normalised black image must come out black in the sprite, not grey
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    black = (torch.zeros(2, 3, 8, 8) - mean) / std
    with SummaryWriter(str(tmp_path)) as writer:
        write_projector(writer, torch.randn(2, 4), black, [0, 1], step=0, images_normalized=True)
    sprite = np.asarray(Image.open(tmp_path / "00000" / "embedding" / "sprite.png").convert("RGB"))
    assert sprite[:8, :8].max() == 0
    with pytest.raises(ValueError):
        write_projector(tmp_path, torch.randn(2, 4), None, ["a"])


# ----------------------------------------------------------------------------- collapse monitor


def test_monitor_fires_once_on_uniform_collapse():
    k = 1024
    monitor = CollapseMonitor(k, warmup_steps=100, patience=5)
    stuck = 0.99 * math.log(k)
    messages = [monitor.update(step, stuck) for step in range(0, 1000, 10)]
    fired = [
        (step, m) for step, m in zip(range(0, 1000, 10), messages, strict=True) if m is not None
    ]
    assert len(fired) == 1
    step, message = fired[0]
    assert step == 140  # steps 100, 110, 120, 130, 140: five logged values after the warmup
    assert "uniform" in message and "--teacher-temp" in message and "log K" in message


def test_monitor_fires_once_on_one_prototype_collapse():
    monitor = CollapseMonitor(1024, patience=3)
    messages = [monitor.update(step, 2.0, batch_entropy=0.01) for step in range(10)]
    assert [m is not None for m in messages] == [False, False, True] + [False] * 7
    assert "same prototype" in messages[2] and "--warmup-teacher-temp-epochs" in messages[2]


def test_monitor_quiet_on_healthy_and_noisy_runs():
    k = 65536
    monitor = CollapseMonitor(k, warmup_steps=10, patience=4)
    # a loss that starts at log K and falls, batch entropy that starts at 0 (random ViT) and grows
    for step in range(200):
        loss = math.log(k) * max(1 - step / 20, 0.3)
        batch_entropy = min(step / 10, 4.0)
        assert monitor.update(step, loss, batch_entropy) is None
    # single collapsed-looking values between healthy ones reset the streak
    noisy = CollapseMonitor(k, patience=3)
    for step in range(50):
        bad = step % 3 == 0
        assert noisy.update(step, 11.0 if bad else 5.0, 0.1 if bad else 3.0) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"out_dim": 1},
        {"patience": 0},
        {"uniform_fraction": 1.0},
        {"uniform_fraction": 0},
        {"min_batch_entropy": -1},
    ],
)
def test_monitor_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="patience"):
        CollapseMonitor(**{"out_dim": 16, **kwargs})
