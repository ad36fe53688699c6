#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test and serving extras into it.
# Idempotent: a second run only checks. Sourced by ./serve.sh, ./test.sh and .ci/run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UNIONCAM_VENV:-$root/.venv}"
if ! command -v java >/dev/null 2>&1 || ! java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])'; then
    echo "bootstrap: TorchServe needs Java 17 or newer on PATH (e.g. apt-get install openjdk-17-jre-headless)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.unioncam-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    # torch and torchvision resolve together from the registry (CUDA builds; they also run on CPU).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test,serve]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
