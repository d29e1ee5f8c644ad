"""What a time budget buys: train the ``cpu-photos`` recipe for N minutes, then evaluate it.

For each budget (default 5, 10 and 15 minutes) one run of
``python -m dino_nb.train --preset cpu-photos --data DATA --minutes N`` (the schedules span
each budget, so every budget is its own run), then ``python -m dino_nb.evaluate`` on its
checkpoint with the full training set as memory bank. Prints one table (the README's
"what to expect"), with the CPU and the load average, since both change the steps that fit.

Usage:
    python benchmarks/photo_curve.py --data ../shared/data/imagenette-photos128
    python benchmarks/photo_curve.py --data builtin --minutes 0.3 --preset cpu   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def run(cmd: list[str]) -> None:
    """Run a command, stop with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=C.REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", required=True, help="a folder with train/ and val/, 'imagenette' or 'builtin'"
    )
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 15], help="budgets to run")
    p.add_argument("--preset", default="cpu-photos")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dino_nb_photo_curve_"))
    print(
        f"{C.machine_line(len(os.sched_getaffinity(0)))}; data {args.data}; runs in {out}",
        flush=True,
    )
    rows = []
    for minutes in args.minutes:
        folder = out / f"{args.preset}-{minutes:g}min"
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        train = [
            sys.executable,
            "-m",
            "dino_nb.train",
            "--preset",
            args.preset,
            "--data",
            args.data,
        ]
        run(
            [
                *train,
                "--minutes",
                str(minutes),
                "--out",
                str(folder),
                "--no-resume",
                "--no-progress",
            ]
        )
        seconds = time.perf_counter() - t0
        state = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = max(r["step"] for r in state)
        rates = [r["images_per_s"] for r in state if "images_per_s" in r] or [
            float("nan")
        ]  # none logged in a tiny budget
        run([sys.executable, "-m", "dino_nb.evaluate", "--checkpoint", str(folder / "checkpoint.pth"),
             "--data", args.data, "--out", str(folder / "eval"), "--no-figures"])  # fmt: skip
        metrics = json.loads((folder / "eval" / "metrics.json").read_text())
        knn = metrics["weighted_k20_top1"]
        rows.append(
            [
                f"{minutes:g}",
                f"{seconds:.0f}",
                steps,
                C.median(rates),
                knn,
                metrics.get("linear_probe_top1"),
                f"{load_before:.1f}",
            ]  # fmt: skip
        )
        print(rows[-1], flush=True)
    C.print_table(
        f"{args.preset} on {args.data}: weighted kNN (k=20, full training set) after a time budget",
        ["minutes", "wall s", "steps", "images/s", "kNN top-1", "linear probe", "load before"],
        rows,
    )


if __name__ == "__main__":
    main()
