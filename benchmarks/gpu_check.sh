#!/usr/bin/env bash
# Benchmark this machine's GPU in one command (about 5-8 minutes on one H100), from the repository root:
#   bash benchmarks/gpu_check.sh              # files in $OUT, else gpu-out/
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on CPU, small (about 3-5 minutes)
#   bash benchmarks/gpu_check.sh --pack       # 4 files only: summary.md, gpu_check.log, steps.json, results.tar.gz
# Uses the machine's own python ($PY, default python3; nothing is installed into it): the repository goes
# on PYTHONPATH, wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh) go into a scratch folder. Where the tree
# has no (or a stale) .git, pass the commit: UNIONCAM_COMMIT=<sha> bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
exec "$PY" benchmarks/gpu_check.py --python "$PY" "$@"
