"""Running TorchServe: ``unioncam serve`` (the default backend), ``unioncam config`` and ``unioncam token``.

``TorchServe`` starts the server with every temp, log, metric and pid file under one run folder;
``unioncam serve`` builds the archive if needed (:mod:`unioncam.serve.archive`) and runs it in the
foreground. Its ``config.properties`` comes from the template shipped in this package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ...models.defaults import random_warning
from ..archive import archived_yaml, build_archive
from ..runs import busy_ports, free_port, new_run_dir, resolve, settings_of

__all__ = ["Ports", "TorchServe", "config_text", "free_port", "serve", "renew_token", "print_config"]


# ----------------------------------------------------------------------------------------- config


@dataclass
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> "Ports":
        return cls(*(free_port() for _ in range(5)))


def set_properties(text: str, values: dict[str, Any]) -> str:
    """``config.properties`` text with each key set to its value: replaced in place, or appended."""
    for key, value in values.items():
        line = f"{key}={value}"
        text, n = re.subn(rf"^{re.escape(key)}=.*$", lambda _m, line=line: line, text, flags=re.M)
        if not n:
            text = text.rstrip("\n") + "\n" + line + "\n"
    return text


def template() -> str:
    """The shipped ``config.properties`` (loopback only, token authorization on, Prometheus metrics)."""
    return resources.files("unioncam.serve.torchserve").joinpath("config.properties").read_text()


def config_text(ports: Ports, max_request_mb: int = 16, max_response_mb: int = 16,
                model_api: bool = False) -> str:
    """``config.properties`` for ``ports``: the shipped template with its addresses moved to those ports
    and its body limits set. ``model_api``: ``enable_model_api=true``, which lets ``POST /models`` register
    (and ``DELETE`` unregister) archives through the management API — anyone holding the management key
    can then load code into the server."""
    mb = 1024 * 1024
    return set_properties(template(), {
        "enable_model_api": "true" if model_api else "false",
        "inference_address": f"http://127.0.0.1:{ports.inference}",
        "management_address": f"http://127.0.0.1:{ports.management}",
        "metrics_address": f"http://127.0.0.1:{ports.metrics}",
        "grpc_inference_port": ports.grpc_inference, "grpc_management_port": ports.grpc_management,
        "max_request_size": max_request_mb * mb, "max_response_size": max_response_mb * mb,
    })


# ------------------------------------------------------------------------------------------ server


@dataclass
class TorchServe:
    """One TorchServe run whose files all live under ``run_dir``.

    ``start()`` launches it (foreground process, our child) and waits until ``model`` answers;
    ``stop()`` ends it. ``run_dir`` gets ``config.properties``, ``key_file.json``, ``logs/``, ``tmp/``.
    """

    model_store: Path
    run_dir: Path
    models: dict[str, str] = field(default_factory=lambda: {"unioncam": "unioncam.mar"})
    ports: Ports = field(default_factory=Ports)
    config: Path | None = None  # a config.properties to use instead of one generated for ``ports``
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def keys(self) -> dict[str, str]:
        """The inference and management tokens from ``key_file.json``."""
        data = json.loads((self.run_dir / "key_file.json").read_text())
        return {"inference": data["inference"]["key"], "management": data["management"]["key"]}

    def headers(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[api]}"}

    def command(self) -> tuple[list[str], dict[str, str]]:
        self.run_dir = Path(self.run_dir).resolve()
        for sub in ("logs", "tmp", "metrics"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "config.properties"
        text = Path(self.config).read_text() if self.config is not None else config_text(self.ports)
        self.ports = _ports_of(text)
        if not any(line.startswith("python=") for line in text.splitlines()):
            # Workers run on this interpreter (the one with torch and ts), whatever PATH says.
            text += f"python={sys.executable}\n"
        config.write_text(text)
        torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent) + os.pathsep
                                  + os.environ.get("PATH", ""))
        if torchserve is None:
            raise RuntimeError("torchserve is not installed: pip install -e '.[serve]' (needs Java 17)")
        models = " ".join(f"{k}={v}" for k, v in self.models.items())
        cmd = [torchserve, "--start", "--foreground", "--ncs", "--model-store", str(Path(self.model_store).resolve()),
               "--ts-config", str(config), "--models", models]
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(TMPDIR=str(self.run_dir / "tmp"), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.run_dir / "metrics"), TEMP=str(self.run_dir / "tmp"))
        # The worker must import the archived engine: drop a source checkout from its path.
        env.pop("PYTHONPATH", None)
        return cmd, env

    def start(self, timeout: float = 180.0) -> "TorchServe":
        cmd, env = self.command()
        self._out = open(self.log_dir / "torchserve.out", "ab")
        # Own process group: Ctrl-C in a terminal reaches us, and we stop the server ourselves.
        self.proc = subprocess.Popen(cmd, cwd=self.run_dir, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        (self.run_dir / "torchserve.pid").write_text(f"{self.proc.pid}\n")
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until every model has a READY worker; raise with the log's tail if the server dies."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                ok = True
                for name in self.models:
                    r = requests.get(f"{self.management_url}/models/{name}", headers=self.headers("management"),
                                     timeout=5)
                    ok = ok and r.status_code == 200 and any(
                        w.get("status") == "READY" for w in r.json()[0].get("workers", []))
                if ok:
                    return
            except (OSError, ValueError, KeyError, requests.RequestException):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"torchserve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        lines = []
        for name in ("torchserve.out", "model_log.log", "ts_log.log"):
            p = self.log_dir / name
            if p.exists():
                lines += [f"--- {p}"] + p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server (SIGTERM to its process group, then SIGKILL) and return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The launcher can exit before its Java frontend and Python workers do: wait for the whole group.
        deadline = time.monotonic() + timeout
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if getattr(self, "_out", None):
            self._out.close()
        return self.proc.returncode

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ports_of(text: str) -> Ports:
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))

    def port(key: str, default: int) -> int:
        return int(props.get(key, f":{default}").rsplit(":", 1)[-1])

    return Ports(port("inference_address", 8080), port("management_address", 8081), port("metrics_address", 8082),
                 int(props.get("grpc_inference_port", 7070)), int(props.get("grpc_management_port", 7071)))


# --------------------------------------------------------------------------------------------- CLI


def _expiry(run_dir: Path, api: str = "inference") -> str:
    data = json.loads((run_dir / "key_file.json").read_text())
    return data[api].get("expiration time", "?")


def _try_line(url: str, name: str, key: str, model: str) -> str:
    """A first request to copy, with a shipped sample image when this folder has one ('' otherwise)."""
    sample = Path("samples/shapes/cross.png") if model == "shapes" else Path("samples/chelsea.png")
    if not sample.is_file():
        return ""
    return (f"try: curl -s -H 'Authorization: Bearer {key}' -T {sample} {url}/explanations/{name}"
            "  (JSON: class, score, map, details)\n")


def serve(args: argparse.Namespace) -> int:
    if args.config:
        config_text_ = Path(args.config).read_text()
    else:
        base = args.port
        if base is not None and base + 4 > 65535:
            raise ValueError(f"--port {base}: the server needs BASE…BASE+4; accepted: a base port in [1, 65531]")
        ports = Ports(base, base + 1, base + 2, base + 3, base + 4) if base is not None else Ports()
        config_text_ = config_text(ports)
    ports = _ports_of(config_text_)
    viewer_port = (args.viewer_port or ports.inference + 10) if args.viewer or args.viewer_port else None
    if viewer_port is not None and not 1 <= viewer_port <= 65535:
        raise ValueError(f"the viewer's port would be {viewer_port}; accepted: --viewer-port in [1, 65535]")
    busy = busy_ports({**vars(ports), **({"viewer": viewer_port} if viewer_port else {})})
    if busy:  # before anything else: never rebuild the archive under a running server
        raise RuntimeError(f"port(s) in use on 127.0.0.1: {', '.join(busy)}. Another server may be running "
                           "(`ls -l runs/current`); stop it, or pass --port BASE to use BASE…BASE+4"
                           + (" (and --viewer-port PORT)." if viewer_port else "."))
    resolve(args, "serve")
    store = Path(args.model_store)
    mar = store / f"{args.name}.mar"
    settings = settings_of(args)
    if args.rebuild or archived_yaml(mar) != settings.yaml():
        print(f"building {mar} ({args.model}, weights {settings.weights_label}) …", flush=True)
        build_archive(settings, store, args.name, force=True)
    run_dir = new_run_dir(args.runs, args.run_name)
    (run_dir / "backend").write_text("torchserve\n")
    (run_dir / "config.in").write_text(config_text_)
    current = Path(args.runs) / "current"
    server = TorchServe(model_store=store, run_dir=run_dir, models={args.name: mar.name},
                        config=run_dir / "config.in")
    print(f"starting TorchServe; run folder {run_dir} ({current} points to it)", flush=True)

    def _terminate(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # `kill` / a service manager: stop the server as Ctrl-C does

    signal.signal(signal.SIGTERM, _terminate)
    # A shell that starts us in the background hands SIGINT down as ignored: Ctrl-C must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    viewer = None
    try:
        server.start(timeout=args.startup_timeout)
        key = server.keys()["inference"]
        if viewer_port:
            from ..viewer import Viewer, archive_info

            viewer = Viewer(server.url, run_dir / "key_file.json", archive_info(mar, args.name), viewer_port).start()
        cost = settings.cost
        print(f"ready: {server.url}/predictions/{args.name}  {server.url}/explanations/{args.name}\n"
              f"model: {settings.model} (weights {settings.weights_label}), {settings.image_size}², explained layer "
              f"{cost.layer} ({cost.channels} channels)\n"
              + (f"{random_warning(settings.model, settings.seed)}\n" if settings.weights == "random" else "")
              + _try_line(server.url, args.name, key, settings.model) +
              f"token: {key}  (in {run_dir / 'key_file.json'}; expires {_expiry(run_dir)}; renew with "
              f"`unioncam token --runs {args.runs}`)\n"
              f"device: {settings.device}; workers: {settings.workers}, batches of up to {settings.max_batch_size} "
              f"({settings.max_batch_delay_ms} ms), response timeout: {settings.timeout} s\n"
              f"explanations with masked forwards at once: {settings.slots_text}\n"
              f"metrics: {server.metrics_url}/metrics   logs: {server.log_dir}\n"
              + (f"viewer: {viewer.url}/  (the browser page; it holds the token, answers only 127.0.0.1)\n"
                 if viewer else "")
              + "Ctrl-C stops the server.", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        print(f"torchserve exited with {server.proc.returncode}:\n{server.log_tail(15)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping TorchServe …", flush=True)
        return 0
    finally:
        if viewer is not None:
            viewer.stop()
        server.stop()


def print_config(args: argparse.Namespace) -> int:
    """Print ``config.properties`` for a plain ``torchserve --start`` (docs/torchserve.md)."""
    base = args.port
    ports = Ports(base, base + 1, base + 2, base + 3, base + 4) if base is not None else Ports()
    text = config_text(ports, model_api=args.enable_model_api)
    if args.model_store:
        text = set_properties(text, {"model_store": str(Path(args.model_store).resolve())})
    sys.stdout.write(text)
    return 0


def renew_token(args: argparse.Namespace) -> int:
    """Renew the inference (or management) key of a running server; print the new key and its expiry."""
    import requests

    run_dir = Path(args.runs) / args.run_name
    keys_file = run_dir / "key_file.json"
    if not keys_file.is_file():
        raise FileNotFoundError(f"{keys_file} does not exist: is a server running with --runs {args.runs}?")
    ports = _ports_of((run_dir / "config.properties").read_text())
    api_key = json.loads(keys_file.read_text())["API"]["key"]
    url = f"http://127.0.0.1:{ports.management}/token"
    try:
        r = requests.post(url, params={"type": args.type}, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    except requests.RequestException as exc:
        raise RuntimeError(f"no server answers at {url} (the management API of {run_dir}): is it still running? "
                           f"Start one with ./serve.sh or `unioncam serve` ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise RuntimeError(f"the server refused to renew the key ({r.status_code}): {r.text.strip()[:300]}")
    data = json.loads(keys_file.read_text())[args.type]
    print(f"{args.type} key: {data['key']}  (expires {data.get('expiration time', '?')}; in {keys_file})")
    return 0
