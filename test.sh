#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
export TRITON_INTERPRET=1  # Triton kernels run on CPU tensors in the tests
exec python -m pytest "$@"
