"""Running TorchServe: ``unioncam serve`` (and the ``unioncam archive`` command).

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

from ..models.defaults import random_warning
from .archive import ArchiveSettings, archived_yaml, build_archive

__all__ = ["Ports", "TorchServe", "add_parser", "config_text", "free_port"]


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return resources.files("unioncam.serve").joinpath("config.properties").read_text()


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


def _settings(args: argparse.Namespace) -> ArchiveSettings:
    return ArchiveSettings(model=args.model, weights=args.weights, seed=args.weights_seed, image_size=args.image_size, method=args.method,
                           theta=args.theta, layer=args.layer, batch_size=args.batch_size, precision=args.precision,
                           max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay,
                           response_timeout_s=args.response_timeout, workers=args.workers,
                           explain_slots=args.explain_slots, device=args.device,
                           workers_per_gpu=args.workers_per_gpu, explain_wait_s=args.explain_wait)


def _resolve(args: argparse.Namespace, command: str) -> None:
    """``--model`` / ``--weights`` / ``--image-size`` left out: the rule of every command
    (:mod:`unioncam.models.defaults`: VGG16 if its ImageNet weights are cached, else the shapes CNN)."""
    from ..models.defaults import resolve_args

    resolve_args(args, command, size="image_size")


def _cmd_archive(args: argparse.Namespace) -> int:
    _resolve(args, "archive")
    if args.kserve:
        from .kserve import write_kserve_layout

        settings = _settings(args)
        layout = write_kserve_layout(settings, args.kserve, args.name)
        print(f"{layout.config}\n{layout.mar}  ({layout.mar.stat().st_size / 1e6:.1f} MB, {args.model}, "
              f"weights {settings.weights_label}); "
              f"upload {layout.root}/ as the InferenceService's storageUri (deploy/kserve/)")
        return 0
    settings = _settings(args)
    mar = build_archive(settings, args.model_store, args.name, force=True)
    print(f"{mar}  ({mar.stat().st_size / 1e6:.1f} MB, {args.model}, weights {settings.weights_label})")
    return 0


def _busy_ports(ports: dict[str, int]) -> list[str]:
    """The ports of ``ports`` that something on 127.0.0.1 already holds, as 'NAME PORT'."""
    busy = []
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"{name.replace('_', ' ')} {port}")
    return busy


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


def _cmd_serve(args: argparse.Namespace) -> int:
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
    busy = _busy_ports({**vars(ports), **({"viewer": viewer_port} if viewer_port else {})})
    if busy:  # before anything else: never rebuild the archive under a running server
        raise RuntimeError(f"port(s) in use on 127.0.0.1: {', '.join(busy)}. Another server may be running "
                           "(`ls -l runs/current`); stop it, or pass --port BASE to use BASE…BASE+4"
                           + (" (and --viewer-port PORT)." if viewer_port else "."))
    _resolve(args, "serve")
    store = Path(args.model_store)
    mar = store / f"{args.name}.mar"
    settings = _settings(args)
    if args.rebuild or archived_yaml(mar) != settings.yaml():
        print(f"building {mar} ({args.model}, weights {settings.weights_label}) …", flush=True)
        build_archive(settings, store, args.name, force=True)
    run_dir = Path(args.runs) / (args.run_name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.in").write_text(config_text_)
    current = Path(args.runs) / "current"  # a stable pointer to the latest run folder
    tmp_link = Path(args.runs) / ".current.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(run_dir.name)
    tmp_link.replace(current)
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
            from .viewer import Viewer, archive_info

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


def _cmd_config(args: argparse.Namespace) -> int:
    """Print ``config.properties`` for a plain ``torchserve --start`` (docs/torchserve.md)."""
    base = args.port
    ports = Ports(base, base + 1, base + 2, base + 3, base + 4) if base is not None else Ports()
    text = config_text(ports, model_api=args.enable_model_api)
    if args.model_store:
        text = set_properties(text, {"model_store": str(Path(args.model_store).resolve())})
    sys.stdout.write(text)
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
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


def _add_archive_options(p: argparse.ArgumentParser) -> None:
    from ..methods import METHODS
    from ..models.defaults import MODEL_HELP, WEIGHTS_HELP, model_arg
    from ..validation import PRECISION_CHOICES, positive_int_arg, theta_arg

    p.add_argument("--model", default=None, type=model_arg, metavar="NAME",
                   help=MODEL_HELP.format(factory=""))
    p.add_argument("--weights", default=None,
                   help=WEIGHTS_HELP + " (for random only the seed is archived)")
    p.add_argument("--weights-seed", "--seed", dest="weights_seed", type=int, default=0,
                   help="seed of --weights random; default 0 (--seed is its old spelling)")
    p.add_argument("--name", default="unioncam", help="model name (the .mar is NAME.mar); default unioncam")
    p.add_argument("--model-store", default="model_store", help="where the .mar goes; default ./model_store")
    p.add_argument("--image-size", "--size", dest="image_size", type=positive_int_arg, default=None,
                   help="images are resized to SIZE×SIZE; default the model's own: 64 for shapes, else 224")
    p.add_argument("--method", default="unioncam", choices=METHODS,
                   help="the method of a request that names none; default unioncam")
    p.add_argument("--theta", type=theta_arg, default=10.0,
                   help="UnionCAM θ of a request that names none, in [0, 100]; default 10")
    p.add_argument("--layer", default=None,
                   help="explained layer; default the model's (vgg16: features.29, resnet: layer4, README table)")
    p.add_argument("--batch-size", type=positive_int_arg, default=None,
                   help="masked inputs per forward; default the engine's: 64 on CUDA, on a CPU 8 at 224² up to 64 at 32²")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32; decided by each worker "
                   "on its device), fp32 (strict float32), tf32 (CUDA), or bf16/fp16 for the masked forwards "
                   "(autocast; scores stay float32); default auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="the machine the defaults are made for (batching, workers, timeouts, slots); "
                   "default cuda when this machine has a GPU, else cpu")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="requests per handler call; default 1 on cpu (a batch is answered all at once: a slow "
                   "explanation would hold up its batch-mates), 8 on cuda (explanations of one batch share chunks)")
    p.add_argument("--max-batch-delay", type=int, default=None,
                   help="milliseconds TorchServe waits to fill a batch; default 50 on cpu, 10 on cuda")
    p.add_argument("--response-timeout", type=int, default=None,
                   help="seconds per batch; default 5× the slowest method's estimate on --device at --image-size, "
                   "≥ 120 (cpu 224²: 736 s, 64²: 120 s)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes; default 2 on cpu (they share the cores), GPUs × --workers-per-gpu on cuda")
    p.add_argument("--workers-per-gpu", type=int, default=2,
                   help="cuda: workers per GPU (one is kept for predictions while another explains); default 2")
    p.add_argument("--explain-slots", type=int, default=None,
                   help="UnionCAM/Score-CAM/Group-CAM explanations at once; default the live workers − 1 "
                   "(per GPU on cuda), so predictions always find a worker, following scaling")
    p.add_argument("--explain-wait", type=float, default=None,
                   help="seconds an explanation may wait for a slot before 503 + Retry-After; default 0 on cpu "
                   "(refused at once), on cuda four batches' estimate (at least 2 s)")


def add_parser(subparsers: Any) -> None:
    """Register ``archive``, ``serve`` and ``token``."""
    from ..validation import port_arg

    ar = subparsers.add_parser("archive", help="build the TorchServe archive model_store/NAME.mar",
                               description="Build NAME.mar with the handler, the unioncam package, "
                               "index_to_name.json, model-config.yaml and the weights.")
    _add_archive_options(ar)
    ar.add_argument("--kserve", metavar="DIR", default=None,
                    help="write KServe's TorchServe layout instead: DIR/config/config.properties (token auth off, "
                    "API on 127.0.0.1:8085 for KServe's wrapper, metrics on :8082) and DIR/model-store/NAME.mar")
    ar.set_defaults(func=_cmd_archive)
    sv = subparsers.add_parser("serve", help="build the archive if needed and run TorchServe in the foreground",
                               description="Build model_store/NAME.mar if missing or built with other "
                               "settings, and run TorchServe with "
                               "its temp, log, metric and pid files under runs/RUN_NAME/. Ctrl-C stops it.")
    _add_archive_options(sv)
    sv.add_argument("--config", default=None,
                    help="config.properties to use; default the shipped template (unioncam/serve/config.properties)")
    sv.add_argument("--port", type=port_arg, default=None,
                    help="base port: inference BASE, management BASE+1, metrics BASE+2, gRPC BASE+3/BASE+4; "
                    "default the template's 8080/8081/8082/7070/7071")
    sv.add_argument("--runs", default="runs", help="parent of run folders; default ./runs")
    sv.add_argument("--run-name", default=None, help="run folder name; default the start time")
    sv.add_argument("--rebuild", action="store_true",
                    help="rebuild the archive even if present with the same settings (e.g. a changed engine)")
    sv.add_argument("--startup-timeout", type=float, default=300.0,
                    help="seconds to wait for the model's workers; default 300")
    sv.add_argument("--viewer", action="store_true",
                    help="also serve the browser page (upload an image, compare methods) on 127.0.0.1; it holds "
                    "the token and forwards to TorchServe")
    sv.add_argument("--viewer-port", type=port_arg, default=None,
                    help="the page's port (implies --viewer); default the inference port + 10 (8090)")
    sv.set_defaults(func=_cmd_serve)
    cf = subparsers.add_parser("config", help="print a config.properties for plain `torchserve --start`",
                               description="Print the shipped config.properties (loopback only, token "
                               "authorization on) for a TorchServe you start yourself: "
                               "torchserve --start --ts-config config.properties (docs/torchserve.md).")
    cf.add_argument("--port", type=int, default=None,
                    help="base port: inference BASE, management BASE+1, metrics BASE+2, gRPC BASE+3/BASE+4; "
                    "default 8080/8081/8082/7070/7071")
    cf.add_argument("--enable-model-api", action="store_true",
                    help="let POST /models register archives through the management API (whoever holds the "
                    "management key can then load code into the server); default off")
    cf.add_argument("--model-store", default=None, help="write model_store=PATH (absolute) into the file")
    cf.set_defaults(func=_cmd_config)
    tk = subparsers.add_parser("token", help="renew the key of a running server (keys expire after 60 minutes)",
                               description="Ask the running server for a new key (TorchServe's token API, "
                               "authorised by the run's API key) and print it; key_file.json is updated.")
    tk.add_argument("--runs", default="runs", help="parent of run folders; default ./runs")
    tk.add_argument("--run-name", default="current", help="run folder; default current (the latest)")
    tk.add_argument("--type", choices=("inference", "management"), default="inference",
                    help="which key: inference (predictions, explanations) or management; default inference")
    tk.set_defaults(func=_cmd_token)
