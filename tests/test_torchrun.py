"""Several processes under ``torchrun`` (2 gloo ranks on the CPU): one decision for all ranks.

A time budget and a stop signal are decided on one rank (rank 0 holds the clock; a SIGTERM
reaches whichever process it is sent to), but every rank must leave the loop at the same
step with the same schedules, or the others wait forever in a collective. Each test has
its own timeout: a hang fails it instead of stalling the suite. A worker script records
each rank's result next to the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_loop import TINY, losses, tiny_data, torchrun  # noqa: F401 - the fixture by name

from dino_nb import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys
from pathlib import Path
from dino_nb.tools.presets import preset
from dino_nb.loop import train

rank, folder = int(os.environ["RANK"]), Path(sys.argv[1])
(folder / f"pid.{rank}").write_text(str(os.getpid()))
cfg = preset("cpu", **json.loads((folder / "config.json").read_text()))
result = train(cfg)
record = {"steps": result.steps, "total": result.total_steps, "interrupted": result.interrupted}
(folder / f"result.{rank}.json").write_text(json.dumps(record))
"""


def launch(folder: Path, **overrides) -> subprocess.Popen:
    """Start 2 gloo ranks of the worker on ``overrides`` (TINY at batch 4 per rank)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("result.*.json"):
        old.unlink()
    (folder / "worker.py").write_text(WORKER)
    cfg = {**TINY, "batch_size": 4, "out": str(folder / "run"), **overrides}
    (folder / "config.json").write_text(json.dumps(cfg))
    return subprocess.Popen(
        torchrun(str(folder / "worker.py"), str(folder)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for torchrun; on a hang, kill it and fail with its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s (a rank hangs):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def results(folder: Path) -> list[dict]:
    return [json.loads((folder / f"result.{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_time_budget_ends_both_ranks_at_the_same_step(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """--minutes under torchrun: rank 0's clock fixes the count; both ranks run it and stop."""
    folder = tmp_path / "budget"
    out = finish(launch(folder, data=str(tiny_data), minutes=0.3, epochs=1000), timeout=240)
    first, second = results(folder)
    assert first == second, out[-2000:]  # same steps, same schedules' length
    # the whole fixed count, or fewer when the machine slowed down after it was fixed (the
    # budget's guard stops early then, on every rank alike)
    assert 0 < first["steps"] <= first["total"] and not first["interrupted"]
    state = ckpt_io.load(folder / "run" / ckpt_io.LAST)
    assert state["step"] == first["steps"] and state["schedule_fixed"]
    assert len(state["rng_by_rank"]) == 2  # each rank's random states


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_all_at_one_step_and_saves(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Kaggle's SIGTERM reaching one rank: every rank stops at the same step, a checkpoint is written."""
    folder = tmp_path / "signal"
    proc = launch(folder, data=str(tiny_data), epochs=1000, save_every=100000)
    deadline = time.monotonic() + 180
    metrics = folder / "run" / "metrics.jsonl"
    while time.monotonic() < deadline:  # wait until both ranks are training
        if (folder / "pid.1").is_file() and metrics.is_file() and len(losses(folder / "run")) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"torchrun ended early:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training did not start within 180 s")
    os.kill(int((folder / "pid.1").read_text()), signal.SIGTERM)
    finish(proc, timeout=120)
    first, second = results(folder)
    assert first == second and first["interrupted"]
    state = ckpt_io.load(folder / "run" / ckpt_io.LAST)
    assert state["step"] == first["steps"]

    # the checkpoint resumes: two more steps from where both ranks stopped
    out = finish(
        launch(folder, data=str(tiny_data), epochs=1000, max_steps=first["steps"] + 2), timeout=180
    )
    assert f"resuming from {folder / 'run' / ckpt_io.LAST} at step {first['steps']}" in out
    assert results(folder)[1]["steps"] == first["steps"] + 2


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_states(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """With drop-path, ranks draw different masks; a resumed run draws what the straight one drew."""
    # 2 blocks: timm's stochastic depth grows linearly from 0 in the first block to the rate
    drop = dict(
        data=str(tiny_data), drop_path_rate=0.5, model_kwargs={**TINY["model_kwargs"], "depth": 2}
    )
    straight = tmp_path / "straight"
    finish(launch(straight, max_steps=6, **drop), timeout=180)
    split = tmp_path / "split"
    finish(launch(split, max_steps=3, **drop), timeout=180)
    finish(launch(split, max_steps=6, **drop), timeout=180)
    assert losses(split / "run") == pytest.approx(losses(straight / "run"), rel=1e-6)
    a = ckpt_io.load(straight / "run" / ckpt_io.LAST)["student"]
    b = ckpt_io.load(split / "run" / ckpt_io.LAST)["student"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
