#!/usr/bin/env bash
# The prepared GPU check (by its own estimates 4.5-6 minutes on one GPU, at most --budget-s, default
# 420 s): a header (card, driver, torch, CUDA, cuDNN), then one row at a time, each printed as
# soon as it is measured and appended to benchmarks/results/gpu_check.md and gpu_check.jsonl
# (git-ignored); the whole output also goes to benchmarks/results/gpu_check.log. Arguments go to
# gpu_check.py (--quick --device cpu: the CPU smoke test; --budget-s; --results DIR).
# `timeout` is only the backstop: the script ends itself at its budget, and what it measured
# before any cut is already on stdout and in the files.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export GPU_CHECK_START="${GPU_CHECK_START:-$(date +%s)}"  # the budget counts from here

budget=420
results=benchmarks/results
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --budget-s) budget="${args[i + 1]:-$budget}" ;;
    --budget-s=*) budget="${args[i]#*=}" ;;
    --results) results="${args[i + 1]:-$results}" ;;
    --results=*) results="${args[i]#*=}" ;;
  esac
done
budget="${budget%%.*}"
[[ "$budget" =~ ^[0-9]+$ ]] || budget=420
python=$(command -v python || command -v python3)
mkdir -p "$results"

# SIGTERM at the budget plus a minute, SIGKILL 30 s later if it still has not ended; to python
# alone (--foreground): loader workers die of SIGTERM, and their death would raise inside
# whatever the main process is doing (a checkpoint save) instead of the clean stop it handles
timeout --foreground -k 30 $((budget + 60)) "$python" benchmarks/gpu_check.py "$@" 2>&1 | tee "$results/gpu_check.log"
status=${PIPESTATUS[0]}
if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "gpu_check.sh: the backstop timeout ended the check (exit $status); the rows above are what it measured (also in $results/gpu_check.md)"
fi
exit "$status"
