"""Progress streamed by a real TorchServe (``unioncam serve``, the shipped shapes CNN at 64²), read with curl:
a client that sends ``progress=true`` gets JSON lines as the explanation runs, then the answer; one that
does not gets today's single answer, also when both share a batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from unioncam.serve.torchserve.server import Ports, config_text

from .fakes import serving

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "samples" / "shapes" / "cross.png"
ND = "application/x-ndjson"

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-progress")
    ports = Ports.free()
    config = base / "config.properties"
    config.write_text(config_text(ports))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    # Batches of up to 3 requests gathered over 1.5 s; 8 masked inputs per forward: a few progress lines each.
    proc = subprocess.Popen(
        [sys.executable, "-m", "unioncam", "serve", "--model", "shapes", "--image-size", "64", "--workers", "1",
         "--max-batch-size", "3", "--max-batch-delay", "1500", "--explain-slots", "3", "--batch-size", "8",
         "--config", str(config), "--runs", str(base / "runs"), "--run-name", "t",
         "--model-store", str(base / "store")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=base)
    with serving(proc):
        key = json.loads((base / "runs" / "t" / "key_file.json").read_text())["inference"]["key"]
        yield {"url": f"http://127.0.0.1:{ports.inference}/explanations/unioncam", "key": key}


def _curl(server, *fields: str) -> tuple[dict[str, str], bytes]:
    """curl -N (no buffering) with the form fields; the response headers and body."""
    args = ["curl", "-sN", "-D", "-", "-H", f"Authorization: Bearer {server['key']}", server["url"],
            "-F", f"image=@{IMAGE}"]
    for f in fields:
        args += ["-F", f]
    raw = subprocess.run(args, capture_output=True, timeout=120, check=True).stdout
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    headers["status"] = lines[0].split()[1]
    return headers, body


def _lines(body: bytes) -> tuple[list[dict], dict]:
    objs = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
    assert all("progress" in o for o in objs[:-1]) and "progress" not in objs[-1], objs
    return [o["progress"] for o in objs[:-1]], objs[-1]


def test_progress_streams_lines_then_the_answer(server):
    headers, body = _curl(server, "method=scorecam", "progress=true")
    assert headers["status"] == "200" and headers["content-type"] == ND
    assert headers.get("transfer-encoding") == "chunked"
    progress, answer = _lines(body)
    ran = answer["details"]["masked_forwards"]
    assert answer["method"] == "scorecam" and answer["class_name"] == "cross"
    assert len(progress) >= 2, progress
    assert progress[0]["done"] == 0 and progress[0]["total"] >= ran, "the total comes before the first forward"
    assert progress[-1]["total"] == ran and all(p["done"] <= p["total"] for p in progress)
    assert all(0 <= p["percent"] <= 100 for p in progress)


def test_a_client_that_did_not_ask_gets_one_answer(server):
    headers, body = _curl(server, "method=scorecam")
    assert headers["status"] == "200" and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body) and "transfer-encoding" not in headers
    assert json.loads(body)["method"] == "scorecam"


def test_one_batch_streaming_to_those_that_asked_only(server):
    results: dict[int, tuple[dict[str, str], bytes]] = {}
    asks = {0: ("method=scorecam", "progress=true"), 1: ("method=scorecam",),
            2: ("method=unioncam", "progress=true")}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _curl(server, *asks[i]))) for i in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == [0, 1, 2]
    assert {results[i][0]["x-batch-size"] for i in results} == {"3"}, "the three requests were not one batch"
    assert results[1][0]["content-type"] == "application/json" and json.loads(results[1][1])["method"] == "scorecam"
    streamed = {i: _lines(results[i][1]) for i in (0, 2)}
    assert all(results[i][0]["content-type"] == ND for i in (0, 2))
    assert len(streamed[0][0]) == len(streamed[2][0]) >= 2, "streaming requests of a batch get the same lines"
    assert streamed[2][1]["method"] == "unioncam" and streamed[0][1]["method"] == "scorecam"
