#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test, serving and docs extras into it.
# Idempotent: a second run only checks. Sourced by ./serve.sh, ./test.sh and .ci/run, and by hand
# (`source scripts/bootstrap.sh` puts the environment's `unioncam` and `python` on PATH).
#
# Sourced, it changes nothing in the calling shell but PATH: the work runs in a child bash with its own
# `set -euo pipefail`, so the caller's options (an interactive terminal's, say) stay as they were and a
# failure returns its status instead of closing the shell.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    __unioncam_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    __unioncam_venv="${UNIONCAM_VENV:-$__unioncam_root/.venv}"
    if UNIONCAM_VENV="$__unioncam_venv" bash "$__unioncam_root/scripts/bootstrap.sh"; then
        export PATH="$__unioncam_venv/bin:$PATH"
        unset __unioncam_root __unioncam_venv
        return 0
    else
        __unioncam_rc=$?
        unset __unioncam_root __unioncam_venv
        eval "unset __unioncam_rc; return $__unioncam_rc"
    fi
fi
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UNIONCAM_VENV:-$root/.venv}"
if ! command -v java >/dev/null 2>&1 || ! java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])'; then
    echo "bootstrap: TorchServe needs Java 17 or newer on PATH (e.g. apt-get install openjdk-17-jre-headless)" >&2
    exit 1
fi
# The browser test drives Debian's Chromium through chromedriver (no browser download at test time).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
        apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                            chromium chromium-driver >/dev/null 2>&1; }
        apt_install || { $sudo apt-get update -qq >/dev/null 2>&1 && apt_install; } \
            || echo "bootstrap: could not install chromium chromium-driver; the browser test will fail or be skipped" >&2
    else
        echo "bootstrap: /usr/bin/chromium or /usr/bin/chromedriver is missing: the browser test will be skipped" \
             "(install with: apt-get install chromium chromium-driver)" >&2
    fi
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.unioncam-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    # torch and torchvision resolve together from the registry (CUDA builds; they also run on CPU).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test,serve,docs]"
    touch "$stamp"
fi
