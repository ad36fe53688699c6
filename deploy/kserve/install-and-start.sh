#!/bin/sh
# The image's two steps, in one script that deploy/kserve/Dockerfile runs (and tests/test_deploy.py runs into a
# fresh venv, as there is no Docker there):
#
#   install-and-start.sh install WHEEL   a venv at $VENV (default /opt/unioncam) with WHEEL[kserve]: the engine,
#                                        torch (from $TORCH_INDEX when set: the CPU wheels) and KServe's server
#   install-and-start.sh start [ARGS]    KServe's model server on $HOST:$PORT (default 0.0.0.0:8080) serving the
#                                        model folder $MODEL_DIR (default /mnt/models, where KServe's storage
#                                        initializer puts the storageUri); ARGS go to `unioncam serve`
#                                        (the ServingRuntime passes --name {{.Name}})
#
# `start` runs without a key (--no-auth): in a cluster, KServe's ingress and mesh authenticate, and the pod's
# port is reached through them only. Run folders go to $RUNS (default /tmp/unioncam-runs, writable by the
# image's non-root user). PIP and PIP_OPTIONS change how the wheel is installed (the test: no downloads).
set -eu

VENV=${VENV:-/opt/unioncam}
PYTHON=${PYTHON:-python3}

case "${1:-}" in
install)
    wheel=${2:?usage: install-and-start.sh install WHEEL}
    if ! "$PYTHON" -c "import venv, ensurepip" 2>/dev/null && command -v apt-get >/dev/null; then
        # A CUDA base image has no Python of its own.
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip
        rm -rf /var/lib/apt/lists/*
    fi
    "$PYTHON" -m venv ${VENV_OPTIONS:-} "$VENV"
    pip=${PIP:-"$VENV/bin/python -m pip"}
    if [ -n "${TORCH_INDEX:-}" ]; then
        $pip install --no-cache-dir ${PIP_OPTIONS:-} --index-url "$TORCH_INDEX" torch torchvision
    fi
    $pip install --no-cache-dir ${PIP_OPTIONS:-} "$wheel[kserve]"
    "$VENV/bin/python" -c "from importlib.metadata import version as v; print('unioncam', v('unioncam'), 'kserve', v('kserve'))"
    ;;
start)
    shift
    exec "$VENV/bin/unioncam" serve --backend kserve --no-auth --host "${HOST:-0.0.0.0}" --port "${PORT:-8080}" \
        --model-dir "${MODEL_DIR:-/mnt/models}" --runs "${RUNS:-/tmp/unioncam-runs}" "$@"
    ;;
*)
    echo "usage: install-and-start.sh install WHEEL | start [unioncam serve options]" >&2
    exit 2
    ;;
esac
