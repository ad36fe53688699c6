"""A user's install: the wheel with ``[serve]`` in a fresh venv, every command run from an unrelated folder.

The venv gets the wheel itself (no checkout on any path) and borrows the already-installed
dependencies (torch, TorchServe, …) through a ``.pth`` line, as the machine is offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from unioncam.serve.torchserve.server import Ports, config_text, free_port

from .fakes import serving

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def build_wheel(base: Path) -> Path:
    """The project's wheel, built from this checkout into ``base/dist``."""
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dist),
          str(ROOT)], cwd=base, env=dict(os.environ))
    (wheel,) = dist.glob("unioncam-*.whl")
    return wheel


def bare_venv(venv: Path) -> Path:
    """A venv without pip that borrows this environment's packages (torch, TorchServe, KServe …) through a
    ``.pth`` line placed after its own site-packages, as the machine is offline; its Python's path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A venv holding only the wheel, and an environment that knows nothing of the checkout."""
    base = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(base)
    venv = base / "venv"
    py = bare_venv(venv)
    # Without PYTHONPATH: a checkout on it (with the egg-info the wheel build leaves) reads as installed.
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--quiet", str(wheel)],
         cwd=base, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The venv's scripts first; TorchServe's launcher from this environment.
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    work = base / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import unioncam; print(unioncam.__file__)"], cwd=work, env=env).strip()
    assert where.startswith(str(site)), where  # the installed wheel, not the checkout
    return {"bin": venv / "bin", "py": py, "env": env, "work": work}


def test_archive_from_the_wheel(user):
    out = _run([str(user["bin"] / "unioncam"), "archive", "--weights", "random", "--image-size", "32",
                "--model-store", "store"], cwd=user["work"], env=user["env"])
    assert (user["work"] / "store" / "unioncam.mar").is_file(), out


def test_serve_from_the_wheel(user):
    import requests

    work = user["work"]
    config = work / "config.properties"
    config.write_text(config_text(Ports.free()))
    viewer_port = free_port()
    proc = subprocess.Popen(
        [str(user["bin"] / "unioncam"), "serve", "--weights", "random", "--image-size", "32", "--method", "gradcam",
         "--model-store", "serve-store", "--run-name", "t", "--config", str(config), "--viewer-port", str(viewer_port)],
        cwd=work, env={**user["env"], "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    with serving(proc) as served:
        lines = served.lines
        run = work / "runs" / "t"
        key = json.loads((run / "key_file.json").read_text())["inference"]["key"]
        url = f"http://127.0.0.1:{_inference_port(config)}"
        auth = {"Authorization": f"Bearer {key}"}
        image = (ROOT / "samples" / "chelsea.png").read_bytes()
        r = requests.post(f"{url}/predictions/unioncam", data=image, headers=auth, timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5
        r = requests.post(f"{url}/explanations/unioncam", files={"image": image}, data={"method": "gradcam"},
                          headers=auth, timeout=120)
        assert r.status_code == 200 and r.json()["map"]["shape"] == [32, 32]
        # The browser page's files are package data of the wheel.
        viewer = f"http://127.0.0.1:{viewer_port}"
        assert f"viewer: {viewer}/" in "".join(lines)
        for name in ("/", "/viewer.js", "/viewer.css"):
            assert requests.get(viewer + name, timeout=30).status_code == 200, name
        assert requests.get(viewer + "/api/info", timeout=30).json()["method"] == "gradcam"
        ready = next(x for x in (run / "logs" / "model_log.log").read_text().splitlines()
                     if "unioncam handler ready" in x)
        assert str(ROOT) not in ready, ready  # the worker runs the archived engine, not the checkout


def _inference_port(config: Path) -> int:
    from unioncam.serve.torchserve.server import _ports_of

    return _ports_of(config.read_text()).inference


def test_evaluate_shapes_from_the_wheel(user):
    work = user["work"]
    _run([str(user["py"]), "-c", "from unioncam.eval.groundtruth import write_folder; write_folder('shapes', 1, 4)"],
         cwd=work, env=user["env"])
    out = _run([str(user["bin"] / "unioncam"), "evaluate", "shapes/images", "--model", "shapes", "--size", "64",
                "--method", "gradcam,unioncam", "--masks", "shapes/masks", "--out", "eval", "-q"],
               cwd=work, env=user["env"])
    assert "| unioncam | 4 |" in out and "| gradcam | 4 |" in out
    settings = json.loads((work / "eval" / "results.json").read_text())["settings"]
    assert settings["model"] == "shapes" and settings["images"] == 4
