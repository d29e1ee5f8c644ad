#!/usr/bin/env bash
# The prepared GPU check (at most 8 minutes on one GPU): one table, printed and saved.
# Needs the project's dependencies (pip install -e .) and a CUDA GPU; the table lands in
# benchmarks/results/gpu_check.md (git-ignored) and on stdout. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mkdir -p benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python benchmarks/gpu_check.py "$@" 2>&1 | tee benchmarks/results/gpu_check.md
