#!/usr/bin/env bash
# Set up (first run only) and serve UnionCAM with TorchServe on 127.0.0.1: ./serve.sh [unioncam serve args]
# Without --model/--weights: ImageNet VGG16 if its file is in the torch hub cache, else the trained shapes CNN
# (shipped; sample images in samples/shapes/). --model NAME [--weights imagenet|random|PATH] for others.
# Run files (token in key_file.json, logs, metrics, temp) go to runs/<start time>/; Ctrl-C stops the server.
# --viewer: it also prints the address of the browser page (http://127.0.0.1:8090/ by default).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec unioncam serve --viewer "$@"
