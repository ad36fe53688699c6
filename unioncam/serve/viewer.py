"""The browser page of ``unioncam serve --viewer``: static files and a token-holding proxy, on 127.0.0.1.

The page (``unioncam/serve/viewer/``: plain HTML, CSS and JavaScript, no network at run time) talks only
to this server. It forwards ``POST /api/predictions`` and ``POST /api/explanations`` to TorchServe's
inference API with ``Authorization: Bearer <inference key>``, the key read from the run folder's
``key_file.json`` on each request (so ``unioncam token`` renewals take effect at once). The key never
reaches the browser: no page, header or body this server sends contains it.

Because whoever can reach the proxy can use the key, it answers only requests that are addressed to it
by its loopback name (``Host`` is ``127.0.0.1:PORT`` or ``localhost:PORT``: a page of another site that
rebinds its DNS name to 127.0.0.1 is refused) and POSTs that carry its own ``Origin`` (another site's
page cannot post to it, a form included).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["MAX_BODY", "STATIC", "Viewer", "archive_info", "layout_info"]

#: Largest request body forwarded: TorchServe's ``max_request_size`` in the shipped config.
MAX_BODY = 16 * 1024 * 1024
#: A streamed answer's content type (``unioncam.serve.protocol.PROGRESS_TYPE``; not imported: no torch here).
PROGRESS_TYPE = "application/x-ndjson"
#: The page's files and their content types; nothing else is served.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
#: Response headers of TorchServe that reach the browser (never anything else of the upstream answer).
PASSED_HEADERS = ("Content-Type", "Retry-After", "X-Batch-Size")
#: The page's own files only; blob:/data: for the uploaded image and the drawn overlay.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def archive_info(mar: str | Path, name: str) -> dict[str, Any]:
    """What the page shows of the served model: its name and the archive's defaults (``model-config.yaml``)."""
    import yaml

    from .archive import archived_yaml

    text = archived_yaml(Path(mar))
    return layout_info((yaml.safe_load(text) or {}) if text else {}, name)


def layout_info(config: dict[str, Any], name: str) -> dict[str, Any]:
    """What the page shows of a model whose ``model-config.yaml`` (an archive's, or KServe's model folder's)
    reads as ``config``."""
    from ..methods import METHODS
    from ..methods import get as get_method

    handler = config.get("handler", {}) or {}
    if handler.get("weights") == "random":
        weights = f"random (seed {handler.get('seed', 0)})"
    else:
        weights = str(handler.get("source", "imagenet"))
    return {
        "model": name,
        "architecture": handler.get("model", "vgg16"),  # archives without the key serve VGG16
        "weights": weights,  # "random (seed 0)": the page says its maps mean nothing
        "image_size": handler.get("image_size"),
        "method": handler.get("method", "unioncam"),
        "theta": handler.get("theta", 10.0),
        "methods": list(METHODS),
        "masked": [m for m in METHODS if get_method(m).masked],
        "max_body": MAX_BODY,
    }


class Viewer:
    """The page and its proxy: ``start()`` serves on ``http://127.0.0.1:PORT`` in a thread, ``stop()`` ends it.

    ``upstream``: TorchServe's inference address; ``key_file``: its ``key_file.json``; ``info``: what
    ``GET /api/info`` answers (:func:`archive_info`); ``port`` 0 picks a free one.
    """

    def __init__(self, upstream: str, key_file: str | Path | None, info: dict[str, Any], port: int = 0,
                 timeout: float = 1800.0, backend: str = "torchserve") -> None:
        self.upstream = upstream.rstrip("/")
        self.key_file = Path(key_file) if key_file is not None else None
        #: ``kserve``: the page's forms go to KServe's v1 routes as JSON, and the answers come back unwrapped.
        self.backend = backend
        self.info = info
        self.timeout = timeout  # above any response timeout TorchServe may hold an explanation for
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.viewer = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None
        # No proxy from the environment: the upstream is on loopback, and the key must not travel further.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hosts(self) -> set[str]:
        return {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}

    @property
    def origins(self) -> set[str]:
        return {f"http://{h}" for h in self.hosts}

    def start(self) -> Viewer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="unioncam-viewer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> Viewer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def server_name(self) -> str:
        return "KServe's model server" if self.backend == "kserve" else "TorchServe"

    def key(self) -> str | None:
        """The inference key now in ``key_file.json`` (renewals included); ``None`` for a server without keys."""
        if self.key_file is None:
            return None
        return json.loads(self.key_file.read_text())["inference"]["key"]

    def forward(self, path: str, body: bytes, content_type: str | None
                ) -> tuple[int, dict[str, str], bytes | Iterator[bytes]]:
        """POST ``body`` to TorchServe's ``path`` with the key; its status, passed headers and body.

        A streamed answer (``progress=true``: JSON lines) comes back as an iterator of its lines, passed on
        to the page as they arrive.
        """
        try:
            key = self.key()
        except (OSError, ValueError, KeyError, TypeError):
            return _sentence(HTTPStatus.SERVICE_UNAVAILABLE,
                             f"The viewer cannot read the server's key from {self.key_file}: is {self.server_name} "
                             "running?")
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        if content_type:
            headers["Content-Type"] = content_type
        if self.backend == "kserve":
            try:
                path, body = _kserve_request(path, body, content_type)
            except ValueError as e:
                return _sentence(HTTPStatus.BAD_REQUEST, f"The upload could not be read as a form: {e}")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.upstream + path, data=body, headers=headers, method="POST")
        try:
            r = self._opener.open(req, timeout=self.timeout)
            if self.backend != "kserve" and (r.headers.get("Content-Type") or "").startswith(PROGRESS_TYPE):
                return r.status, _passed(r.headers), _lines(r)
            with r:
                status, passed, answer = r.status, _passed(r.headers), r.read()
        except urllib.error.HTTPError as e:  # a 4xx/5xx answer: pass it on as it is
            with e:
                return e.code, _passed(e.headers), e.read()
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, or no HTTP at all
            reason = getattr(e, "reason", e)
            return _sentence(HTTPStatus.BAD_GATEWAY,
                             f"{self.server_name} at {self.upstream} did not answer ({reason}). Is the server still "
                             "running?")
        if self.backend == "kserve":
            return _kserve_answer(status, passed, answer)
        return status, passed, answer


def _kserve_request(path: str, body: bytes, content_type: str | None) -> tuple[str, bytes]:
    """The page's multipart form (``image`` and options) as a KServe v1 body for ``path``'s verb."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise ValueError(f"the content type is {content_type!r}, not multipart/form-data")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    instance: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name in ("image", "file", "data"):
            instance["image"] = {"b64": base64.b64encode(data).decode("ascii")}
        elif name == "progress":  # KServe's model server answers in one body: the page shows the time instead
            continue
        elif name:
            instance[name] = data.decode("utf-8", "replace")
    verb = "explain" if path.startswith("/explanations/") else "predict"
    model = path.split("/", 2)[2]
    return f"/v1/models/{model}:{verb}", json.dumps({"instances": [instance]}).encode()


def _kserve_answer(status: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """A v1 answer of one instance unwrapped to what TorchServe's plain routes answer (the page reads those)."""
    try:
        doc = json.loads(body)
        (name, [answer]), = doc.items()
    except (ValueError, TypeError):
        return status, headers, body
    if isinstance(answer, dict) and "code" in answer and "error" in answer:
        return int(answer["code"]), {"Content-Type": "application/json"}, json.dumps(answer).encode()
    if isinstance(answer, str):  # format png: base64 in JSON
        return status, {**headers, "Content-Type": "image/png"}, base64.b64decode(answer)
    if name == "explanations" and isinstance(answer, list):
        answer = {"explanations": answer}
    elif name == "predictions":
        answer = {"predictions": answer}
    return status, {**headers, "Content-Type": "application/json"}, json.dumps(answer).encode()


def _lines(r: Any) -> Iterator[bytes]:
    """The lines of a streamed answer as they arrive; the upstream connection closes at the end."""
    with r:
        while True:
            line = r.readline()
            if not line:
                return
            yield line


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The key goes to TorchServe's address only, never to wherever a redirect points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _passed(headers: Any) -> dict[str, str]:
    return {h: headers[h] for h in PASSED_HEADERS if headers.get(h) is not None}


def _sentence(status: int, message: str) -> tuple[int, dict[str, str], bytes]:
    """An answer of ours, shaped like the API's errors so the page reads both alike."""
    body = {"code": int(status), "message": message}
    return int(status), {"Content-Type": "application/json"}, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "unioncam-viewer"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    routes: ClassVar[dict[str, str]] = {"/api/predictions": "/predictions/{model}", "/api/explanations": "/explanations/{model}"}

    @property
    def viewer(self) -> Viewer:
        return self.server.viewer  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the terminal belongs to `unioncam serve`'s start-up lines

    def _send(self, status: int, headers: dict[str, str], body: bytes | Iterator[bytes]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if not isinstance(body, (bytes, bytearray)):
            self._stream(body)
            return
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _stream(self, lines: Iterator[bytes]) -> None:
        """The rest of a streamed answer: HTTP chunks, one per line, each sent as it arrives."""
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        try:
            for line in lines:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
        except (OSError, http.client.HTTPException):  # the page went away, or TorchServe broke off
            self.close_connection = True
            return
        finally:
            getattr(lines, "close", lambda: None)()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _refuse(self, status: int, message: str) -> None:
        self._send(*_sentence(status, message))

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        if host in self.viewer.hosts:
            return True
        self.close_connection = True
        self._refuse(HTTPStatus.FORBIDDEN, f"This page answers only as {self.viewer.url}/ (Host {host or 'missing'!r} "
                     "refused: another name for this address could be a DNS-rebinding page).")
        return False

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        name = "index.html" if path == "/" else path.lstrip("/")
        if path == "/api/info":
            self._send(HTTPStatus.OK, {"Content-Type": "application/json"}, json.dumps(self.viewer.info).encode())
        elif name in STATIC:
            body = resources.files("unioncam.serve").joinpath("viewer", name).read_bytes()
            self._send(HTTPStatus.OK, {"Content-Type": STATIC[name]}, body)
        else:
            self._refuse(HTTPStatus.NOT_FOUND, f"There is no page {path!r} here; the viewer is at {self.viewer.url}/.")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        origin = self.headers.get("Origin")
        if origin not in self.viewer.origins:
            self.close_connection = True
            self._refuse(HTTPStatus.FORBIDDEN, f"Only the viewer's own page ({self.viewer.url}) may post here "
                         f"(Origin {origin or 'missing'!r} refused).")
            return
        if path not in self.routes:
            self.close_connection = True
            self._refuse(HTTPStatus.NOT_FOUND, f"There is no API {path!r} here: use /api/predictions or /api/explanations.")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "The upload must say its length (Content-Length).")
            return
        if length > MAX_BODY:
            self.close_connection = True  # the body is not read: this connection cannot carry another request
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"The upload is {length / 2**20:.1f} MiB; the server takes at most {MAX_BODY // 2**20} MiB.")
            return
        body = self.rfile.read(length)
        upstream = self.routes[path].format(model=self.viewer.info["model"])
        self._send(*self.viewer.forward(upstream, body, self.headers.get("Content-Type")))
