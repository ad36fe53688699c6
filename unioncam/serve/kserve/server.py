"""Running KServe's model server: ``unioncam serve --backend kserve`` (and ``unioncam token`` for its runs).

KServe's ``ModelServer`` binds ``0.0.0.0`` and parses the process's command line when imported; this
runner uses its data plane, routes and exception handlers but runs the HTTP server itself, so that it
listens where ``--host`` says (127.0.0.1 unless told otherwise; the container passes 0.0.0.0) and
nothing else (no gRPC port). In front of KServe's routes sits :class:`Guard`, which keeps the TorchServe
path's promises:

* a bearer key: ``Authorization: Bearer <key>`` with the inference key of the run folder's
  ``key_file.json`` (TorchServe's form; it expires after :data:`KEY_MINUTES`, ``unioncam token`` renews
  it; re-read when the file changes). ``/v2/health/live``, ``/v2/health/ready`` and ``/metrics`` answer
  without it, for probes and Prometheus. ``--no-auth`` turns the key off for a server behind a mesh
  that authenticates (a KServe InferenceService);
* the body limit of TorchServe's ``max_request_size`` (16 MiB): past it, 413;
* errors as the protocol's JSON (``code``, ``error.field/problem/accepted``, ``message``), KServe's own
  refusals (a body that is not JSON, a v2 body its schema rejects) included.

SIGTERM and Ctrl-C stop it gracefully: no new connections, requests in flight finish (up to
:data:`GRACE_S`), then the port is closed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ...errors import InvalidInputError
from .. import protocol
from ..runs import busy_ports, new_run_dir, resolve, settings_of

__all__ = ["GRACE_S", "Guard", "KEY_MINUTES", "MAX_BODY", "build_app", "renew_token", "serve", "write_keys"]

logger = logging.getLogger(__name__)

#: Minutes a key lives, as TorchServe's (its default ``token_expiration_min``).
KEY_MINUTES = 60
#: Largest request body, as TorchServe's ``max_request_size`` in the shipped config.
MAX_BODY = 16 * 1024 * 1024
#: Seconds the server waits for requests in flight when told to stop.
GRACE_S = 30
#: Routes that answer without a key: probes and metrics.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})


# ------------------------------------------------------------------------------------------- keys


def _expiry(minutes: int = KEY_MINUTES) -> str:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=minutes)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_keys(key_file: Path, renew: str | None = None) -> dict[str, Any]:
    """Write ``key_file`` in TorchServe's form (``management``/``inference`` keys with an expiration time,
    and the ``API`` key); ``renew``: replace only that key of an existing file. Written whole, then moved."""
    data = json.loads(key_file.read_text()) if renew and key_file.is_file() else {}
    for api in ("management", "inference"):
        if renew is None or api == renew:
            data[api] = {"key": secrets.token_urlsafe(18), "expiration time": _expiry()}
    data.setdefault("API", {"key": secrets.token_urlsafe(18)})
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, key_file)
    return data


class _Keys:
    """The inference key of ``key_file``, re-read when the file changes (``unioncam token``)."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self._stamp: int | None = None
        self._key: tuple[str, float] | None = None

    def current(self) -> tuple[str, float] | None:
        try:
            stamp = self.key_file.stat().st_mtime_ns
            if stamp != self._stamp:
                entry = json.loads(self.key_file.read_text())["inference"]
                expires = dt.datetime.strptime(entry["expiration time"], "%Y-%m-%dT%H:%M:%S.%fZ")
                self._key = (entry["key"], expires.replace(tzinfo=dt.timezone.utc).timestamp())
                self._stamp = stamp
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self._key


# ------------------------------------------------------------------------------------------ guard


def _error(status: int, field: str, problem: str, accepted: str) -> tuple[int, bytes]:
    return status, json.dumps(protocol.error_body(status, InvalidInputError(field, problem, accepted))).encode()


class Guard:
    """ASGI middleware: the bearer key and the body limit, before KServe's routes see a request."""

    def __init__(self, app: Any, keys: _Keys | None, max_body: int = MAX_BODY) -> None:
        self.app, self.keys, self.max_body = app, keys, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self._refusal(scope["path"], headers)
        if refused is not None:
            return await _send(send, *refused)
        if scope["path"].endswith("/infer") and "inference-header-content-length" not in headers:
            # A v2 body without the binary extension is JSON, whatever content type a client gave it (curl -d
            # says urlencoded), and KServe reads other types as binary tensors.
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")])
        limit = self.max_body
        seen = 0

        async def bounded() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        started = False

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded, watch)
        except _TooLarge:
            if not started:
                await _send(send, *self._too_large(seen))

    def _too_large(self, size: int) -> tuple[int, bytes]:
        return _error(413, "body", f"is over {size / 2**20:.1f} MiB",
                      f"at most {self.max_body // 2**20} MiB (TorchServe's max_request_size)")

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[int, bytes] | None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return self._too_large(int(length))
        if self.keys is None or path in OPEN_PATHS:
            return None
        current = self.keys.current()
        given = headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        accepted = ("Authorization: Bearer <the inference key in the run folder's key_file.json>; renew an "
                    "expired key with `unioncam token`")
        if current is None:
            return _error(401, "Authorization", f"cannot be checked: {self.keys.key_file} is unreadable", accepted)
        key, expires = current
        if not token or not secrets.compare_digest(token.encode(), key.encode()):
            return _error(401, "Authorization", "is missing or not the current inference key", accepted)
        if time.time() > expires:
            return _error(401, "Authorization", "is a key that has expired", accepted)
        return None


class _TooLarge(Exception):
    pass


async def _send(send: Any, status: int, body: bytes, content_type: str = "application/json",
                headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# -------------------------------------------------------------------------------------------- app


def _import_kserve() -> Any:
    """``kserve.model_server`` parses ``sys.argv`` when imported: show it none of ours."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve.model_server as model_server
    except ImportError as exc:
        raise RuntimeError(f"KServe's model server is not installed ({exc}): pip install 'unioncam[kserve]'") from None
    finally:
        sys.argv = argv
    return model_server


def build_app(model: Any, keys_file: Path | None, max_body: int = MAX_BODY) -> Any:
    """KServe's FastAPI app serving ``model`` (loaded), with the protocol's errors and :class:`Guard` in front."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
    from starlette.exceptions import HTTPException

    from .model import Answer

    model_server = _import_kserve()
    from kserve.protocol.rest.server import RESTServer

    server = model_server.ModelServer(http_port=0, enable_grpc=False, workers=1, enable_docs_url=False)
    server.register_model(model)
    model.start()
    rest = RESTServer(model_server.FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, 0)
    rest.create_application()
    app = model_server.app

    def answer(status: int, field: str, problem: str, accepted: str, headers: dict | None = None) -> JSONResponse:
        body = protocol.error_body(status, InvalidInputError(field, problem, accepted))
        return JSONResponse(body, status_code=status, headers=headers)

    async def on_answer(_request: Any, exc: Answer) -> Response:
        if exc.content_type == "application/json" and not isinstance(exc.body, bytes):
            return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)
        return Response(exc.body, status_code=exc.status, media_type=exc.content_type, headers=exc.headers)

    json_bodies = ("a JSON object: {'instances': [{'image': {'b64': <base64>}, ...}]} (v1) or {'inputs': "
                   "[{'name': 'image', 'datatype': 'BYTES', 'shape': [n], 'data': [<base64>, ...]}]} (v2)")

    async def on_invalid(_request: Any, exc: Exception) -> JSONResponse:
        return answer(400, "body", f"was refused by KServe's decoder ({str(exc)[:300]})", json_bodies)

    async def on_schema(_request: Any, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "InferenceRequest")) or "body"
        return answer(400, where, f"does not fit the v2 request schema ({first.get('msg', 'invalid')})", json_bodies)

    async def on_not_found(_request: Any, exc: Exception) -> JSONResponse:
        return answer(404, "model", f"is not served here ({exc})", f"the model {model.name!r}")

    async def on_not_ready(_request: Any, exc: Exception) -> JSONResponse:
        return answer(503, "model", f"is not ready yet ({exc})", "a retry once /v2/health/ready says ready",
                      {"Retry-After": "5"})

    async def on_http(_request: Any, exc: HTTPException) -> JSONResponse:
        return answer(exc.status_code, "route", f"{exc.detail}", "the routes of docs/deployment.md")

    async def on_error(_request: Any, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return answer(500, "request", f"failed in the server: {type(exc).__name__}: {str(exc)[:200]}",
                      "a retry; the server's log has the cause")

    app.add_exception_handler(Answer, on_answer)
    app.add_exception_handler(InvalidInput, on_invalid)
    app.add_exception_handler(RequestValidationError, on_schema)
    app.add_exception_handler(ModelNotFound, on_not_found)
    app.add_exception_handler(ModelNotReady, on_not_ready)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
    app.add_middleware(Guard, keys=_Keys(keys_file) if keys_file is not None else None, max_body=max_body)
    return app


# -------------------------------------------------------------------------------------------- CLI


def serve(args: argparse.Namespace) -> int:
    """``unioncam serve --backend kserve``: the model folder (written now, or ``--model-dir``), then the server."""
    import uvicorn

    from .layout import write_layout
    from .model import UnionCAMModel

    host = args.host or "127.0.0.1"
    port = 8080 if args.port is None else args.port
    viewer_port = (args.viewer_port or port + 10) if args.viewer or args.viewer_port else None
    if viewer_port is not None and not 1 <= viewer_port <= 65535:
        raise ValueError(f"the viewer's port would be {viewer_port}; accepted: --viewer-port in [1, 65535]")
    busy = busy_ports({"http": port, **({"viewer": viewer_port} if viewer_port else {})})
    if busy:
        raise RuntimeError(f"port(s) in use on 127.0.0.1: {', '.join(busy)}. Another server may be running "
                           "(`ls -l runs/current`); stop it, or pass --port PORT")
    run_dir = new_run_dir(args.runs, args.run_name).resolve()
    (run_dir / "backend").write_text("kserve\n")
    if args.model_dir:
        model_dir = Path(args.model_dir)
        label = f"the model folder {model_dir}"
    else:
        resolve(args, "serve")
        settings = settings_of(args)
        model_dir = run_dir / "model"
        print(f"writing the model folder {model_dir} ({args.model}, weights {settings.weights_label}) …", flush=True)
        write_layout(settings, model_dir)
        label = f"{settings.model} (weights {settings.weights_label})"
    keys_file = None if args.no_auth else run_dir / "key_file.json"
    if keys_file is not None:
        write_keys(keys_file)
    print(f"starting KServe's model server; run folder {run_dir}", flush=True)
    device = args.device or ("cuda" if _has_cuda() else "cpu")
    model = UnionCAMModel(args.name, model_dir, device)
    model.load()
    app = build_app(model, keys_file)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=GRACE_S,
                            lifespan="off", access_log=False)
    server = uvicorn.Server(config)

    def _terminate(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # re-raised by uvicorn once it has shut down: stop as Ctrl-C does

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    # The port is bound and listening before the start-up lines say "ready": a client that acts on them is
    # queued by the kernel until uvicorn accepts, never refused.
    sock = config.bind_socket()
    sock.listen(config.backlog)
    viewer = None
    try:
        if viewer_port:
            from ..viewer import Viewer, layout_info

            viewer = Viewer(url, keys_file, layout_info(model.config, args.name), viewer_port,
                            backend="kserve").start()
        key = f"token: {json.loads(keys_file.read_text())['inference']['key']}  (in {keys_file}; expires in " \
              f"{KEY_MINUTES} min; renew with `unioncam token --runs {args.runs}`)\n" if keys_file else \
              "token: none (--no-auth: only for a server behind a mesh that authenticates)\n"
        d = model.defaults
        print(f"ready: {url}/v1/models/{args.name}:predict  {url}/v1/models/{args.name}:explain  "
              f"{url}/v2/models/{args.name}/infer\n"
              f"model: {label}, {d.image_size}², listening on {host}:{port}\n" + key +
              f"device: {device}; replicas: {model.replicas}; explanations with masked forwards at once: "
              f"{model.services[0].slots.n or 'no limit'}\n"
              f"metrics: {url}/metrics   health: {url}/v2/health/ready\n"
              + (f"viewer: {viewer.url}/  (the browser page; it holds the token, answers only 127.0.0.1)\n"
                 if viewer else "")
              + "Ctrl-C stops the server.", flush=True)
        server.run(sockets=[sock])
        print("\nKServe's model server stopped.", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nstopping KServe's model server …", flush=True)
        return 0
    finally:
        sock.close()
        if viewer is not None:
            viewer.stop()
        model.stop()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def renew_token(args: argparse.Namespace) -> int:
    """``unioncam token`` for a KServe run: a new key in ``key_file.json`` (the server reads it at once)."""
    run_dir = Path(args.runs) / args.run_name
    keys_file = run_dir / "key_file.json"
    if not keys_file.is_file():
        raise FileNotFoundError(f"{keys_file} does not exist: is a server running with --runs {args.runs} "
                                "(and without --no-auth)?")
    data = write_keys(keys_file, renew=args.type)[args.type]
    print(f"{args.type} key: {data['key']}  (expires {data['expiration time']}; in {keys_file})")
    return 0
