"""The benchmark scripts still run against the package (a quick pass, not a measurement)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_data import make_folder

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_augment_quick_prints_a_ratio_per_setting(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_augment.py", "--quick", "--photos", "64x48"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert rows[0].split("|")[1].strip() == "setting"
    assert len(rows) == 1 + 5  # header + four crop settings + the --gpu-augment CPU side
    for row in rows[1:]:
        tutorial, ours, ratio = (float(c) for c in row.split("|")[2:5])
        assert tutorial > 0 and ours > 0 and ratio > 0
    assert re.search(r"generated 64x48 JPEGs", result.stdout)


def test_bench_augment_rejects_a_malformed_photo_size():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_augment.py", "--photos", "big"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--photos must look like 500x375" in result.stderr


@pytest.mark.slow
def test_bench_loader_quick_prints_three_paths_and_the_step(tmp_path):
    data = make_folder(tmp_path / "data", n_train=12, n_val=2, size=(40, 30))  # 24 train images
    args = [
        "--quick",
        "--data",
        str(data),
        "--batch",
        "8",
        "--global-size",
        "16",
        "--local-size",
        "8",
    ]
    args += ["--n-local", "2", "--canvas", "20", "--out-dim", "64"]
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_loader.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "TMPDIR": str(tmp_path),
            "OMP_NUM_THREADS": "1",
            "DINO_NB_CACHE": str(tmp_path / "cache"),
        },
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert rows[0].split("|")[1].strip() == "path"
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "PIL",
        "JPEG + batched",
        "cache + batched",
    ]
    for row in rows[1:]:
        rate, ratio, ms = (float(c) for c in row.split("|")[2:5])
        assert rate > 0 and ratio > 0 and ms > 0
    assert (data / ".dino_nb_cache").is_dir()  # the pixel cache was built beside the data
    assert re.search(r"reference: the training step .* [0-9.]+ images/s", result.stdout)


@pytest.mark.slow
def test_bench_gpu_augment_quick_prints_a_row_per_setting():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu_augment.py", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [c.strip() for c in rows[0].split("|")[1:-1]] == [
        "setting",
        "threads",
        "hand-written",
        "kornia",
        "ratio",
    ]
    assert len(rows) == 1 + 2  # header + the paper's views from a 256 canvas + small photos
    for row in rows[1:]:
        hand, kornia, ratio = (c.strip() for c in row.split("|")[3:6])
        assert float(hand) > 0
        assert (kornia, ratio) == ("n/a", "n/a") or (float(kornia) > 0 and float(ratio) > 0)


@pytest.mark.slow
def test_gpu_check_quick_runs_every_row_on_the_cpu(tmp_path):
    """The GPU check's table, shrunk to a CPU smoke run: every row prints a positive rate."""
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    names = [row.split("|")[1].strip() for row in rows[1:]]
    assert names == [
        "step fp32",
        "loop, CPU PIL augment",
        "loop, --gpu-augment",
        "imagenette preset, 4 steps",
        "evaluation features (autocast)",
    ]
    for row in rows[1:]:
        assert float(row.split("|")[2]) > 0


@pytest.mark.slow
def test_photo_curve_trains_within_a_budget_and_evaluates(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/photo_curve.py",
            "--data",
            "builtin",
            "--preset",
            "cpu",
            "--minutes",
            "0.1",
            "--out",
            str(tmp_path),
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == 2
    minutes, _, steps, rate, knn = (c.strip() for c in rows[1].split("|")[1:6])
    assert minutes == "0.1" and int(steps) >= 1 and 0 < float(knn) <= 1
    assert rate == "n/a" or float(rate) > 0  # no step logged when a busy machine fits few steps
    assert (tmp_path / "cpu-0.1min" / "eval" / "metrics.json").is_file()
