"""`source scripts/bootstrap.sh` by hand, as the docs say: the caller's shell keeps its options and survives.

The script runs against a stand-in environment (a ``bin/python`` and an install stamp newer than
``pyproject.toml``, so it only checks) and a stand-in ``java`` that reports a version, so no install runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()) or not shutil.which("bash"),
    reason="without Debian's chromium the bootstrap would try to install it",
)

# An interactive shell sources the script, then runs a failing command, and reports what it saw.
SESSION = r"""
set +e
before="$(set +o; shopt -p)"
source scripts/bootstrap.sh
echo "sourced=$?"
false
echo "alive-after-false"
after="$(set +o; shopt -p)"
if [ "$before" = "$after" ]; then echo "options-unchanged"; else diff <(echo "$before") <(echo "$after"); fi
case ":$PATH:" in *":$UNIONCAM_VENV/bin:"*) echo "venv-on-path";; esac
compgen -v | grep -c "^__unioncam" || true
"""


def _stand_ins(tmp_path: Path, java_version: str) -> dict[str, str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\necho 'the stand-in python must not be run' >&2; exit 9\n")
    python.chmod(0o755)
    stamp = venv / ".unioncam-installed"
    stamp.touch()
    later = (ROOT / "pyproject.toml").stat().st_mtime + 3600
    os.utime(stamp, (later, later))
    tools = tmp_path / "tools"
    tools.mkdir()
    java = tools / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{java_version}\" 2024-01-16' >&2\n")
    java.chmod(0o755)
    return {"HOME": str(tmp_path), "PATH": f"{tools}:/usr/bin:/bin", "UNIONCAM_VENV": str(venv), "TERM": "dumb"}


def _session(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "--norc", "--noprofile", "-i", "-c", SESSION], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_sourcing_keeps_the_callers_options_and_puts_the_environment_on_path(tmp_path):
    r = _session(_stand_ins(tmp_path, "17.0.10"))
    out = r.stdout.splitlines()
    assert "sourced=0" in out, r.stdout + r.stderr
    assert "alive-after-false" in out and "options-unchanged" in out, r.stdout + r.stderr
    assert "venv-on-path" in out, r.stdout
    assert out[-1] == "0", f"the script left its own variables in the shell: {r.stdout}"


def test_a_failing_bootstrap_returns_its_status_and_the_shell_lives_on(tmp_path):
    r = _session(_stand_ins(tmp_path, "11.0.2"))  # too old: the script refuses
    out = r.stdout.splitlines()
    assert "sourced=1" in out, r.stdout + r.stderr
    assert "Java 17 or newer" in r.stderr
    assert "alive-after-false" in out and "options-unchanged" in out, r.stdout + r.stderr
    assert "venv-on-path" not in out
