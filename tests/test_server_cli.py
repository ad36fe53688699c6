"""``unioncam serve`` / ``unioncam archive`` from the command line, and the shipped config.properties."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unioncam.serve.torchserve.server import Ports, _ports_of, config_text

from .fakes import serving

ROOT = Path(__file__).resolve().parent.parent


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_shipped_config_is_loopback_only_with_token_auth():
    text = (ROOT / "unioncam" / "serve" / "torchserve" / "config.properties").read_text()
    props = _props(text)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["metrics_mode"] == "prometheus"
    assert 0 < int(props["max_request_size"]) <= 64 * 1024 * 1024
    assert text == config_text(Ports())  # the template holds the default ports
    assert _ports_of(text) == Ports()
    moved = Ports(18080, 18081, 18082, 17070, 17071)
    other = config_text(moved)
    assert _ports_of(other) == moved
    # only the five port lines differ
    assert sum(a != b for a, b in zip(text.splitlines(), other.splitlines())) == 5


def test_archive_refuses_bad_weights_clearly(tmp_path, capsys):
    from unioncam.cli import main

    assert main(["archive", "--weights", str(tmp_path / "missing.pth"), "--model-store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing.pth" in err and "neither 'imagenet', 'random' nor an existing file" in err
    assert main(["archive", "--weights", "random", "--image-size", "8", "--model-store", str(tmp_path)]) == 2
    assert "image-size" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.server
def test_serve_builds_runs_and_stops_on_ctrl_c(tmp_path):
    import requests

    config = tmp_path / "config.properties"
    config.write_text(config_text(Ports.free()))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unioncam", "serve", "--weights", "random", "--image-size", "32",
         "--method", "gradcam", "--model-store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs"),
         "--run-name", "t", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    run = tmp_path / "runs" / "t"
    with serving(proc) as served:
        lines = served.lines
        assert (tmp_path / "store" / "unioncam.mar").is_file()
        for sub in ("key_file.json", "config.properties", "torchserve.pid", "logs/model_log.log", "tmp"):
            assert (run / sub).exists(), sub
        key = json.loads((run / "key_file.json").read_text())["inference"]["key"]
        port = _ports_of(config.read_text()).inference
        r = requests.post(f"http://127.0.0.1:{port}/predictions/unioncam", data=(ROOT / "samples/chelsea.png").read_bytes(),
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5
        assert (tmp_path / "runs" / "current").resolve() == run.resolve()  # the stable pointer
        assert any("expires" in x and "unioncam token" in x for x in lines)
        assert any(x.startswith("model: vgg16 (weights random (seed 0))") for x in lines)
        assert any("RANDOM weights (seed 0)" in x and "mean nothing" in x for x in lines)
        # Renew the key while it runs: the new one works, the old one no longer does.
        env_cli = dict(env)
        out = subprocess.run([sys.executable, "-m", "unioncam", "token", "--runs", str(tmp_path / "runs")],
                             capture_output=True, text=True, env=env_cli, cwd=tmp_path, timeout=60)
        assert out.returncode == 0, out.stderr
        new = json.loads((run / "key_file.json").read_text())["inference"]["key"]
        assert new != key and new in out.stdout and "expires" in out.stdout
        for k, status in ((new, 200), (key, 400)):
            r = requests.post(f"http://127.0.0.1:{port}/predictions/unioncam",
                              data=(ROOT / "samples/chelsea.png").read_bytes(),
                              headers={"Authorization": f"Bearer {k}"}, timeout=60)
            assert r.status_code == status
        # A second server on the same ports says so first, and leaves the archive alone.
        mar = tmp_path / "store" / "unioncam.mar"
        stamp = mar.stat().st_mtime_ns
        second = subprocess.run(
            [sys.executable, "-m", "unioncam", "serve", "--weights", "random", "--image-size", "64",
             "--model-store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs2"), "--config", str(config)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert second.returncode == 2 and "in use" in second.stderr and "--port" in second.stderr
        assert mar.stat().st_mtime_ns == stamp and not (tmp_path / "runs2").exists()
        ts_pid = int((run / "torchserve.pid").read_text())
        rest = served.stop()  # Ctrl-C, as in the terminal: a clean exit
        assert "stopping TorchServe" in rest
        with pytest.raises(ProcessLookupError):
            os.killpg(ts_pid, 0)  # the whole TorchServe process group is gone


def test_port_sets_every_address_and_a_busy_one_is_named_first(tmp_path, capsys):
    import socket

    from unioncam.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        base = held.getsockname()[1] - 2  # the metrics port (BASE+2) is the busy one
        rc = main(["serve", "--port", str(base), "--weights", "random", "--image-size", "32",
                   "--model-store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"metrics {base + 2}" in err and "--port" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()  # nothing built or started
