"""``unioncam archive --kserve DIR``: KServe's TorchServe storage layout, started as the runtime starts it.

KServe's runtime runs ``torchserve --start --ts-config /mnt/models/config/config.properties --model-store
/mnt/models/model-store``; here the same command runs on the written folder, with the addresses moved to free
127.0.0.1 ports through TorchServe's environment config (``enable_envvars_config=true`` → ``TS_<PROPERTY>``)
and every temp/log/metric file under the test's folder. Then the KServe v1/v2 routes that KServe's wrapper
forwards to (``/v1/models/<m>:predict|:explain``, ``/v2/models/<m>/infer|/explain``) are called without a
token, as the wrapper calls them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unioncam.serve.server import _group_alive, free_port

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
NAME = "unioncam"


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop the whole process group (``torchserve --start`` returns while Java and workers run on)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        # Reap the launcher as it exits: an unreaped zombie leader keeps the group "alive" to killpg(…, 0).
        while proc.poll() is None or _group_alive(proc.pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if proc.poll() is not None and not _group_alive(proc.pid):
            break
    proc.wait(timeout)


def test_kserve_layout_serves_v1_and_v2(tmp_path):
    layout = tmp_path / "kserve"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "unioncam", "archive", "--kserve", str(layout), "--weights", "random",
                          "--image-size", "32", "--method", "gradcam", "--workers", "1"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    # Exactly KServe's layout: config/config.properties and model-store/<name>.mar, nothing else.
    assert sorted(str(p.relative_to(layout)) for p in layout.rglob("*")) == [
        "config", "config/config.properties", "model-store", f"model-store/{NAME}.mar"]
    props = _props((layout / "config" / "config.properties").read_text())
    assert props["inference_address"] == props["management_address"] == "http://127.0.0.1:8085"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["enable_envvars_config"] == "true" and props["disable_token_authorization"] == "true"
    assert props["metrics_mode"] == "prometheus" and int(props["max_request_size"]) == 16 * 1024 * 1024
    snap = json.loads(props["model_snapshot"])
    assert snap["modelCount"] == 1
    entry = snap["models"][NAME]["1.0"]
    assert entry["marName"] == f"{NAME}.mar" and entry["minWorkers"] == entry["maxWorkers"] == 1
    assert entry["batchSize"] == 1 and entry["responseTimeout"] == 120

    # Start it as the runtime does; only environment variables move it to free loopback ports.
    run = tmp_path / "run"
    for sub in ("tmp", "logs", "metrics"):
        (run / sub).mkdir(parents=True)
    inf, met, gi, gm = (free_port() for _ in range(4))
    bindir = str(Path(sys.executable).parent)
    torchserve = shutil.which("torchserve", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    assert torchserve, "torchserve is not installed"
    ts_env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
                  TMPDIR=str(run / "tmp"), TEMP=str(run / "tmp"), LOG_LOCATION=str(run / "logs"),
                  METRICS_LOCATION=str(run / "metrics"),
                  TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{inf}", TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{inf}",
                  TS_METRICS_ADDRESS=f"http://127.0.0.1:{met}", TS_GRPC_INFERENCE_PORT=str(gi),
                  TS_GRPC_MANAGEMENT_PORT=str(gm))
    ts_env.pop("PYTHONPATH", None)  # the worker imports the archived engine
    ts_env.pop("TS_CONFIG_FILE", None)
    # KServe's runtime arguments, with the folder in place of /mnt/models (no --foreground: the launcher
    # returns and leaves the frontend running in its process group, which _stop ends).
    cmd = [torchserve, "--start", f"--model-store={layout / 'model-store'}",
           f"--ts-config={layout / 'config' / 'config.properties'}"]
    with open(run / "logs" / "torchserve.out", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=run, env=ts_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{inf}"
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and not ready:
            assert _group_alive(proc.pid), (run / "logs" / "torchserve.out").read_text()[-4000:]
            try:
                r = requests.get(f"{url}/models/{NAME}", timeout=5)  # management API, same port, no token
                ready = r.status_code == 200 and any(w.get("status") == "READY" for w in r.json()[0]["workers"])
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pass
            if not ready:
                time.sleep(0.5)
        assert ready, (run / "logs" / "torchserve.out").read_text()[-4000:]
        # the archive's settings from the snapshot
        desc = requests.get(f"{url}/models/{NAME}", timeout=10).json()[0]
        assert desc["batchSize"] == 1 and desc["minWorkers"] == 1

        b64 = base64.b64encode((ROOT / "samples" / "chelsea.png").read_bytes()).decode()
        v1 = requests.post(f"{url}/v1/models/{NAME}:predict", json={"instances": [{"image": {"b64": b64}}]},
                           timeout=120)
        assert v1.status_code == 200, v1.text
        preds = v1.json()["predictions"]
        assert len(preds) == 1 and len(preds[0]) == 5
        v2 = requests.post(f"{url}/v2/models/{NAME}/infer", timeout=120,
                           json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]})
        assert v2.status_code == 200, v2.text
        assert json.loads(v2.json()["outputs"][0]["data"][0]) == preds[0]

        v1e = requests.post(f"{url}/v1/models/{NAME}:explain", timeout=120,
                            json={"instances": [{"image": {"b64": b64}, "method": "gradcam", "target": 7}]})
        assert v1e.status_code == 200, v1e.text
        e1 = v1e.json()["explanations"][0]
        assert e1["method"] == "gradcam" and e1["class"] == 7
        v2e = requests.post(f"{url}/v2/models/{NAME}/explain", timeout=120,
                            json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                                  "parameters": {"method": "gradcam", "target": 7}})
        assert v2e.status_code == 200, v2e.text
        e2 = json.loads(v2e.json()["outputs"][0]["data"][0])
        assert e2["map"] == e1["map"] and e2["class"] == 7

        metrics = requests.get(f"http://127.0.0.1:{met}/metrics", timeout=10).text
        assert "ExplanationLatency" in metrics
        # The environment, not the file's 8085, decided the address.
        assert f"127.0.0.1:{inf}" in (run / "logs" / "ts_log.log").read_text()
    finally:
        _stop(proc)
    assert not _group_alive(proc.pid)


def test_kserve_layout_refuses_a_second_archive(tmp_path):
    from unioncam.serve.archive import ArchiveSettings
    from unioncam.serve.kserve import write_kserve_layout

    (tmp_path / "model-store").mkdir()
    (tmp_path / "model-store" / "other.mar").write_bytes(b"")
    with pytest.raises(FileExistsError, match="other.mar"):
        write_kserve_layout(ArchiveSettings(weights="random", image_size=32), tmp_path)
    assert not (tmp_path / "config").exists()  # refused before anything was written
