"""docs/torchserve.md as written: its bash blocks run in order in one shell, in an empty folder, against a
real TorchServe on 127.0.0.1 (the page's ports 8080… moved to free ones), and print what the page says."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "torchserve.md"
PORTS = (8080, 8081, 8082, 7070, 7071)
_TS_LOG = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[,.]\d+ \[")  # TorchServe's log4j lines


def blocks(text: str) -> list[str]:
    """The page's ```bash blocks, but those marked ``<!-- not-run: … -->`` on the line before."""
    found = re.finditer(r"(?:^(<!-- not-run:[^\n]*-->)\n)?^```bash\n(.*?)^```", text, flags=re.M | re.S)
    return [m.group(2) for m in found if not m.group(1)]


def _free_base() -> int:
    """A base port B with B…B+4 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 4 > 65535:
            continue
        ok = True
        for p in range(base, base + 5):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no five free ports in a row")


def test_the_plain_torchserve_page_runs_as_written(tmp_path):
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    if shutil.which("torchserve", path=path) is None:
        pytest.skip("torchserve is not installed")
    base = _free_base()
    script = "\n".join(f"echo '=== block {i}'\n{b}" for i, b in enumerate(blocks(PAGE.read_text())))
    moved = {old: base + i for i, old in enumerate(PORTS)}
    script = re.sub(r"\b(8080|8081|8082|7070|7071)\b", lambda m: str(moved[int(m.group(1))]), script)
    (tmp_path / "page.sh").write_text("set -euo pipefail\n" + script + "\necho '=== done'\n")
    work = tmp_path / "work"
    (work / "tmp").mkdir(parents=True)
    # TEMP: TorchServe's own temp folder (unpacked archives, the workers' sockets), apart from other servers'.
    env = dict(os.environ, TMPDIR=str(work / "tmp"), TEMP=str(work / "tmp"), PATH=path)
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run(["bash", str(tmp_path / "page.sh")], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
    finally:
        subprocess.run(["torchserve", "--stop"], cwd=work, env=env, capture_output=True, timeout=60)
    out = proc.stdout
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (work / "logs").glob("*.log")) \
        if (work / "logs").is_dir() else ""
    assert proc.returncode == 0 and "=== done" in out, out[-3000:] + proc.stderr[-3000:] + logs
    # What the page printed, TorchServe's own log lines (on the same console) apart: every failure shows it.
    said = "\n".join(line for line in out.splitlines() if not _TS_LOG.match(line))
    print(said)  # pytest shows it in full on a failure (an assertion message is cut short)
    model_log = (work / "logs" / "model_log.log").read_text()
    assert "unioncam handler ready" in model_log, model_log[-3000:]
    expected = (
        ('"status": "Healthy"', "/ping with the inference key"),
        ("ping without the key: 400", "/ping without a key"),
        ("metrics: 200", "the metrics endpoint needs no key"),
        ("disk unioncam [64, 64]", "the trained shapes CNN explains the drawn disk"),
        ('"class_name": "disk"', "the trained shapes CNN predicts the drawn disk"),
        ("workers 2 min 2 max 2 batch 1", "the archive's two CPU workers"),
        ("Workers scaled to 3", "scaling up"),
        ("register without the model API: 405", "register refused"),
        ("unregister without the model API: 405", "unregister refused"),
        ("registered with 2 initial workers", "initial_workers=1 overridden by the archive"),
        ("Workers scaled to 1", "scaling down"),
        ('unregistered', "unregistering through the model API"),
    )
    for text, what in expected:
        assert text in out, f"{what}: {text!r} is not in what the page printed:\n{said[-6000:]}\n--- logs:\n{logs}"
    assert out.count("TorchServe has stopped") == 2, said[-6000:]
