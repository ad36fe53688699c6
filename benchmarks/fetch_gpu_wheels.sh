#!/usr/bin/env bash
# On a machine with a package registry: put the wheels that benchmarks/gpu_check.sh installs into .whl/
# (git-ignored; it travels with the working tree to a GPU machine that has no network).
#   grad-cam 1.5.7  (PyPI has only an sdist: built here with pip wheel --no-deps)
#   torchcam 0.5.0, ttach 0.0.3 (grad-cam needs it)
#   pytest and its dependencies (each only installed there if the GPU machine lacks it)
# Their other dependencies (opencv, scikit-learn, scipy, matplotlib, tqdm, torch) must be on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
"$PY" -m pip wheel --no-deps --wheel-dir .whl "grad-cam==1.5.7"
"$PY" -m pip download --no-deps --only-binary=:all: --dest .whl "torchcam==0.5.0" "ttach==0.0.3"
"$PY" -m pip download --no-deps --only-binary=:all: --dest .whl pytest pluggy iniconfig packaging pygments
ls -l .whl
