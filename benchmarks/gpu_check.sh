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
# Refuse in one sentence before any step: a python without torch, or (unless --dry-run) no CUDA GPU.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "gpu_check: $PY cannot import torch: run with a python that has it (PY=/path/to/python bash $0)" >&2
    exit 2
fi
case " $* " in *" --dry-run "*) ;; *)
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        echo "gpu_check: no CUDA GPU is visible to $PY's torch; this pass benchmarks a GPU (--dry-run runs its steps on CPU)" >&2
        exit 2
    fi;;
esac
# Ctrl-C, a timeout's SIGTERM or a hang-up ends the pass and every process under it (each step runs in
# a session of its own, out of the terminal's reach).
tree() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$c"; done; echo "$1"; }
stop() {
    trap '' INT TERM HUP
    local pids p; pids=$(tree "$pass")
    for p in $pids; do kill -TERM -- "-$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 $pids 2>/dev/null || break
        sleep 0.5
    done
    for p in $pids; do kill -0 "$p" 2>/dev/null && { kill -KILL -- "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; }; done
    echo "gpu_check: stopped ($1); its steps were ended" >&2
    exit 130
}
"$PY" benchmarks/gpu_check.py --python "$PY" "$@" &
pass=$!
trap 'stop interrupted' INT
trap 'stop terminated' TERM HUP
wait "$pass"
