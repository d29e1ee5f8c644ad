"""The benchmark scripts still run against the package (a quick pass, not a measurement)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
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
    assert (
        len(rows) == 1 + 3
    )  # header + the main job's views + the paper's + --gpu-augment's CPU side
    for row in rows[1:]:
        readable, fast, ratio = (float(c) for c in row.split("|")[2:5])
        assert readable > 0 and fast > 0 and ratio > 0
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


GPU_CHECK_ROWS = [
    "step bf16",
    "step fp16",
    "step fp32",
    "loop, PIL augment",
    "loop, gpu_augment",
    "evaluation features",
    "step + compile",
]


def _gpu_check(args, tmp_path, shell=False):
    """Start the GPU check (``--quick --device cpu``); its stdout is a pipe read line by line."""
    cmd = (
        ["bash", "benchmarks/gpu_check.sh"]
        if shell
        else [sys.executable, "benchmarks/gpu_check.py"]
    )
    cmd += ["--quick", "--device", "cpu", "--results", str(tmp_path / "results"), *args]
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("GPU_CHECK_START", None)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    watchdog = threading.Timer(600, proc.kill)  # a hang fails the test instead of blocking it
    watchdog.daemon = True
    watchdog.start()
    return proc


def _table_rows(lines):
    """``{row name: [cells]}`` of the table lines (header and separator left out)."""
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")]
    return {c[0]: c[1:] for c in cells if c[0] != "row" and not c[0].startswith("---")}


def _jsonl(tmp_path):
    text = (tmp_path / "results" / "gpu_check.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_gpu_check_prints_each_row_as_soon_as_it_is_measured(tmp_path):
    """The header first, then each row on stdout and in the Markdown file while the others still run."""
    proc = _gpu_check([], tmp_path, shell=True)
    md = tmp_path / "results" / "gpu_check.md"
    lines, arrivals, in_file_at_once = [], {}, {}
    for line in iter(proc.stdout.readline, ""):
        line = line.rstrip("\n")
        lines.append(line)
        name = line.split("|")[1].strip() if line.startswith("| ") else ""
        if name in GPU_CHECK_ROWS:
            arrivals[name] = time.monotonic()
            in_file_at_once[name] = line in md.read_text().splitlines()
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    first_row = next(i for i, line in enumerate(lines) if line.startswith("| "))
    header = "\n".join(lines[:first_row])
    assert "- device: CPU" in header
    assert re.search(r"torch \S+, CUDA \S+, cuDNN \S+", header)
    assert re.search(r"total with \d+ s of set-up: \d+ of the 420 s budget", header)
    rows = _table_rows(lines)
    assert list(rows) == GPU_CHECK_ROWS
    for name in (
        "step bf16",
        "step fp32",
        "loop, PIL augment",
        "loop, gpu_augment",
        "evaluation features",
    ):
        assert float(rows[name][0]) > 0, rows[name]
    assert rows["step fp16"][-1] == "skipped: fp16 autocast needs a GPU"
    assert rows["step + compile"][-1].startswith("skipped: --quick")
    assert all(in_file_at_once.values()), in_file_at_once
    # rows come as they are measured, not as one table at the end
    assert arrivals["evaluation features"] - arrivals["step bf16"] > 1.0
    records = _jsonl(tmp_path)
    assert [r["kind"] for r in records] == ["header"] + ["row"] * 7 + ["end"]
    assert records[1]["row"] == "step bf16" and records[1]["images_per_s"] > 0
    assert records[-1]["stopped"] is None
    assert "5 of 7 rows measured" in (tmp_path / "results" / "gpu_check.log").read_text()


@pytest.mark.slow
def test_gpu_check_cut_short_by_sigterm_keeps_what_it_measured(tmp_path):
    """SIGTERM (what ``timeout`` sends) ends the check at once; the rows measured stay reported."""
    proc = _gpu_check([], tmp_path)
    for line in iter(proc.stdout.readline, ""):
        if line.startswith("| step bf16 |"):
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    rows = _table_rows((tmp_path / "results" / "gpu_check.md").read_text().splitlines())
    assert list(rows) == GPU_CHECK_ROWS  # every row says what became of it
    assert float(rows["step bf16"][0]) > 0
    assert any("SIGTERM" in cells[-1] for cells in rows.values())
    end = _jsonl(tmp_path)[-1]
    assert end["kind"] == "end" and "SIGTERM" in end["stopped"]
    assert end["statuses"]["step bf16"] == "ok"


@pytest.mark.slow
def test_gpu_check_skips_the_rows_its_budget_cannot_fit(tmp_path):
    proc = _gpu_check(["--budget-s", "0"], tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = _table_rows(out.splitlines())
    assert list(rows) == GPU_CHECK_ROWS
    assert re.fullmatch(r"skipped: budget \(needs ~\d+ s, 0 s left\)", rows["step bf16"][-1])
    assert all(r["status"] == "skipped" for r in _jsonl(tmp_path) if r["kind"] == "row")


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
