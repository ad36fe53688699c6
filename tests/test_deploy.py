"""The image's steps without Docker: ``deploy/kserve/install-and-start.sh`` into a fresh venv from the built wheel,
then the server it installed, started by the same script, called on its routes and its manifests' probes.

As in tests/test_wheel.py the machine is offline: the venv borrows this environment's packages through a
``.pth`` line and the script installs the wheel with ``PIP_OPTIONS=--no-deps`` (the Dockerfile lets pip fetch
them). The server listens on 127.0.0.1 here (``HOST``); the image's default is 0.0.0.0.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("kserve")
requests = pytest.importorskip("requests")

from unioncam.serve.runs import free_port  # noqa: E402

from .test_manifests import probes  # noqa: E402
from .test_wheel import _run, bare_venv, build_wheel  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.server]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "kserve" / "install-and-start.sh"
PNG = (ROOT / "samples" / "shapes" / "cross.png").read_bytes()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The script's install step into a fresh venv: what the Dockerfile's RUN does."""
    base = tmp_path_factory.mktemp("image")
    wheel = build_wheel(base)
    venv = base / "opt-unioncam"
    py = bare_venv(venv)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VENV=str(venv), PYTHON=sys.executable, VENV_OPTIONS="--without-pip",
               PIP=f"{sys.executable} -m pip --python {py}", PIP_OPTIONS="--no-deps --no-index --quiet",
               TMPDIR=str(base), HOME=str(base))
    out = _run(["sh", str(SCRIPT), "install", str(wheel)], cwd=base, env=env)
    assert "unioncam 0.1.0 kserve 0.21" in out, out
    where = _run([str(py), "-c", "import unioncam; print(unioncam.__file__)"], cwd=base, env=env)
    assert where.startswith(str(venv)), where  # the wheel the script installed, not the checkout
    return {"base": base, "venv": venv, "env": env}


def test_the_script_starts_the_installed_server_on_the_model_folder(image):
    base, env = image["base"], dict(image["env"])
    models = base / "mnt-models"
    # What a user uploads to the storageUri: the model folder, written by the installed command.
    _run([str(image["venv"] / "bin" / "unioncam"), "archive", "--kserve", str(models), "--model", "shapes",
          "--weights", "shipped"], cwd=base, env=env)
    assert sorted(p.name for p in models.iterdir()) == ["index_to_name.json", "model-config.yaml", "shapes.pth"]
    port = free_port()
    env.update(HOST="127.0.0.1", PORT=str(port), MODEL_DIR=str(models), RUNS=str(base / "runs"))
    proc = subprocess.Popen(["sh", str(SCRIPT), "start", "--name", "unioncam-cpu"], cwd=base, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the installed server never got ready")
        for runtime, path, probe_port in probes():  # the manifests' probes, on the route they name
            assert probe_port == 8080  # the image's PORT
            r = requests.get(url + path, timeout=10)
            assert r.status_code == 200, (runtime, path, r.status_code, r.text[:200])
        # --no-auth (behind KServe's ingress): no key, and the model under the InferenceService's name.
        b64 = base64.b64encode(PNG).decode()
        r = requests.post(f"{url}/v1/models/unioncam-cpu:explain", timeout=60,
                          json={"instances": [{"image": {"b64": b64}, "method": "gradcam"}]})
        assert r.status_code == 200 and r.json()["explanations"][0]["class_name"] == "cross", r.text[:300]
        r = requests.post(f"{url}/v2/models/unioncam-cpu/infer", timeout=60, json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
            "parameters": {"explain": True, "method": "layercam"}})
        assert r.status_code == 200, r.text[:300]
        assert json.loads(r.json()["outputs"][0]["data"][0])["method"] == "layercam"
        assert requests.get(url + "/metrics", timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the script exec'd the server: the group is the server
        code = proc.wait(60)
    assert code == 0, proc.stdout.read()
