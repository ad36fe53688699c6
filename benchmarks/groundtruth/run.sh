#!/usr/bin/env bash
# Regenerate the ground-truth benchmark table, its reference rows and the figure (CPU, one thread; ≈ 15–20 min on a busy 2-core machine).
#   benchmarks/groundtruth/run.sh [N]     # N held-out images, default 300
# Resumable: rerun after an interruption and it continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
N=${1:-300}
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
DATA=data/shapes-heldout
[ -d "$DATA/images" ] || $PY benchmarks/groundtruth/make_data.py "$DATA" --seed 1 --n "$N" --size 64
$PY -m unioncam evaluate "$DATA/images" --model shapes --method all --size 64 --pixels-per-step 64 \
    --masks "$DATA/masks" --chunk 16 --out benchmarks/results/groundtruth
$PY -m unioncam figure --shapes 6 --shapes-seed 1 --size 64 --model shapes --method all \
    --out benchmarks/results/groundtruth/figure.png
$PY benchmarks/groundtruth/reference_rows.py "$N"
