"""``torchrun --nproc-per-node 2 -m unioncam evaluate``: two CPU processes (gloo) give a one-process run's tables.

Both runs score the same 5 sampled images of the shapes folder with the committed shapes CNN, one image per
explanation batch and one thread per process, so every per-image number is computed the same way. Compared:
``results.md``, ``results.csv`` and ``results.json`` exactly, except the timing column ``seconds`` ("s / image"
and its standard error), which is wall-clock time and differs from run to run; the per-image rows
(``results.jsonl``) as a set, again without ``seconds``.

Network: ``--master-addr 127.0.0.1`` on a free port and ``GLOO_SOCKET_IFNAME=lo`` keep the ranks' traffic on
loopback; torchrun's rendezvous store itself listens on every interface of the machine (torch offers no
option to bind it to one address) for the few seconds of each launch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unioncam.eval.groundtruth import write_folder
from unioncam.serve.torchserve.server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _args(folder: Path, out: Path) -> list[str]:
    return ["-m", "unioncam", "evaluate", str(folder / "images"), "--model", "shapes", "--method", "gradcam,unioncam",
            "--size", "32", "--limit", "5", "--seed", "1", "--no-insertion-deletion", "--masks",
            str(folder / "masks"), "--chunk", "1", "--out", str(out), "-q"]


def _md_without_seconds(text: str) -> str:
    table, _, note = text.partition("\n\n")
    lines = table.splitlines()
    col = [c.strip() for c in lines[0].split("|")].index("s / image")
    keep = []
    for line in lines:
        cells = line.split("|")
        keep.append("|".join(c for i, c in enumerate(cells) if i != col))
    return "\n".join(keep) + "\n\n" + note


def _csv_without_seconds(text: str) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "seconds_se")}
            for row in csv.DictReader(io.StringIO(text))]


def _json_without_seconds(text: str) -> dict:
    doc = json.loads(text)
    for entry in doc["table"]:
        entry.pop("seconds", None)
        entry.pop("seconds_se", None)
    return doc


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds")
        rows[(r["image"], r["method"])] = r
    return rows


def test_two_process_torchrun_equals_one_process(tmp_path):
    folder = tmp_path / "shapes"
    write_folder(folder, seed=3, n=6, size=32)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               TMPDIR=str(tmp_path))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, *_args(folder, one)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *_args(folder, two)],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("| gradcam | 5 |") == 1  # only rank 0 prints the table

    assert not list(two.glob("results.rank*.jsonl"))  # merged into results.jsonl
    rows1, rows2 = _rows(one / "results.jsonl"), _rows(two / "results.jsonl")
    assert len(rows2) == 10 and rows2 == rows1
    assert _md_without_seconds((two / "results.md").read_text()) == _md_without_seconds((one / "results.md").read_text())
    assert _csv_without_seconds((two / "results.csv").read_text()) == _csv_without_seconds((one / "results.csv").read_text())
    assert _json_without_seconds((two / "results.json").read_text()) == _json_without_seconds(
        (one / "results.json").read_text())

    # A rerun under torchrun resumes: nothing left to score, the same tables.
    before = (two / "results.csv").read_text()
    r3 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *_args(folder, two)],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert (two / "results.csv").read_text() == before


def test_one_process_resumes_rank_files(tmp_path):
    # Rows left in results.rank<R>.jsonl by an interrupted torchrun count as done; one process scores the
    # rest and merges everything into results.jsonl.
    from unioncam.eval import evaluate as ev

    folder = tmp_path / "shapes"
    write_folder(folder, seed=3, n=4, size=32)
    settings = ev.EvalSettings(method=("gradcam",), model="shapes", size=32, insertion_deletion=False)
    full = ev.evaluate(folder / "images", tmp_path / "a", settings, progress=False)
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines()
    out = tmp_path / "b"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    (out / "results.rank0.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n")
    (out / "results.rank1.jsonl").write_text(lines[1] + "\n")
    resumed = ev.evaluate(folder / "images", out, settings, progress=False)
    assert not list(out.glob("results.rank*.jsonl"))
    rows = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == 4 and set(lines[:3]) <= set(rows)  # kept as written, only the 4th scored
    # One image re-scored alone rather than in a batch of 4: equal up to batch-size-dependent rounding.
    for a, b in zip(_json_without_seconds(json.dumps(resumed))["table"], _json_without_seconds(json.dumps(full))["table"]):
        assert a.keys() == b.keys() and a["n"] == b["n"] == 4
        for k, v in a.items():
            assert v == (b[k] if isinstance(v, str) else pytest.approx(b[k], rel=1e-5, abs=1e-6, nan_ok=True)), k
