#!/usr/bin/env bash
# Re-execute every notebook in the small, deterministic "ci" profile and store the outputs,
# which `pytest` (strict nbval) then compares with fresh runs. Run from anywhere:
#   scripts/regenerate_notebooks.sh                  # all notebooks
#   scripts/regenerate_notebooks.sh notebooks/03_head_and_loss.ipynb
# Then check twice that the stored outputs repeat: python -m pytest notebooks/ -q
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -gt 0 ]; then notebooks=("$@"); else notebooks=(notebooks/[0-9]*.ipynb); fi
export DINO_NB_PROFILE=ci OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for nb in "${notebooks[@]}"; do
    start=$SECONDS
    jupyter nbconvert --to notebook --execute --inplace \
        --ExecutePreprocessor.record_timing=False --ExecutePreprocessor.timeout=600 "$nb" </dev/null 2>&1 \
        | grep -v -e "running over TCP without encryption" -e "^\[NbConvertApp\] Writing" || true
    # keep outputs and counts; drop widget state and the Python patch version
    nbstripout --keep-output --keep-count \
        --extra-keys "metadata.widgets metadata.language_info.version" "$nb"
    echo "$nb: $((SECONDS - start)) s"
done
