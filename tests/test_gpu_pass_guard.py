"""The GPU pass's front door (benchmarks/gpu_check.sh): it refuses in one sentence where it cannot run,
and Ctrl-C or a timeout's SIGTERM ends every process under it (its steps run in sessions of their own)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, py: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out"), *args], env={**env, "PY": py},
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the pass would run")
def test_without_cuda_the_pass_refuses_in_one_sentence_unless_dry_run(tmp_path):
    r = _run(tmp_path, sys.executable)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "out").exists(), "no step ran"


def test_a_python_without_torch_is_one_sentence(tmp_path):
    bare = tmp_path / "bare-python"  # this interpreter without its site-packages: no torch
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    r = _run(tmp_path, str(bare), "--dry-run")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import torch" in lines[0] and "Traceback" not in r.stderr


def _descendants(pid: int) -> set[int]:
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for row in rows:
        if row.strip():
            p, pp = map(int, row.split())
            children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps (procps) to find the pass's processes")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "timeout"])
def test_ctrl_c_or_a_timeout_ends_the_steps_too(tmp_path, sig):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "UNIONCAM_TRITON")}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), "--budget", "300",
                             "--wheels", str(tmp_path / "no-wheels")], env={**env, "PY": sys.executable},
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: the "terminal" whose Ctrl-C we send
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            seen |= _descendants(proc.pid)
            if len(seen) >= 2 and (tmp_path / "out" / "preflight.log").exists():
                break  # the pass and its first step are running
            time.sleep(0.2)
        assert proc.poll() is None and len(seen) >= 2, "the pass did not start a step"
        seen |= _descendants(proc.pid)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C goes to its foreground group
        else:
            proc.send_signal(sig)  # `timeout` signals the command it ran
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "stopped" in err, err
        time.sleep(0.5)
        left = [p for p in seen if _alive(p)]
        assert not left, f"processes left running after the pass stopped: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _descendants(proc.pid) | seen:  # orphans too, should the pass have left any
            if _alive(p):
                os.kill(p, signal.SIGKILL)
