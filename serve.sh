#!/usr/bin/env bash
# Set up (first run only) and explain the sample photo with UnionCAM: ./serve.sh [unioncam explain args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
if [ "$#" -eq 0 ]; then set -- samples/chelsea.png --weights random --out out; fi
exec unioncam explain "$@"
