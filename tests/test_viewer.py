"""The viewer's proxy (``unioncam serve --viewer``) against a fake TorchServe: no Java, no model.

The fake upstream records what reaches it and answers what a test asks for. The proxy must add the key
(read anew on each request), never hand it to the browser, and refuse requests that are not the page's.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import pytest

from unioncam.serve.torchserve.server import free_port
from unioncam.serve.viewer import MAX_BODY, STATIC, Viewer, archive_info

requests = pytest.importorskip("requests")

KEY = "k3y-0f-the-f1rst-run"
INFO = {"model": "unioncam", "architecture": "vgg16", "image_size": 32, "method": "unioncam", "theta": 10.0,
        "methods": ["unioncam", "gradcam"], "masked": ["unioncam"], "max_body": MAX_BODY}


class Upstream:
    """A stand-in for TorchServe's inference API: records requests, answers ``self.reply``."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.reply = (200, {"Content-Type": "application/json", "X-Batch-Size": "1"}, b'{"predictions": []}')
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, out = outer.reply
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _write_key(path: Path, key: str) -> None:
    path.write_text(json.dumps({"management": {"key": "mgmt"}, "inference": {"key": key}, "API": {"key": "api"}}))


@pytest.fixture
def upstream():
    up = Upstream()
    yield up
    up.close()


@pytest.fixture
def viewer(tmp_path, upstream):
    _write_key(tmp_path / "key_file.json", KEY)
    with Viewer(upstream.url, tmp_path / "key_file.json", INFO) as v:
        yield v


def _post(v: Viewer, path: str = "/api/predictions", origin: str | None = "own", **kw) -> requests.Response:
    headers = dict(kw.pop("headers", {}))
    if origin is not None:
        headers["Origin"] = v.url if origin == "own" else origin
    return requests.post(v.url + path, headers=headers, timeout=30, **kw)


def _everything_served(v: Viewer) -> list[bytes]:
    """Every byte the browser can get: the page's files and /api/info, headers included."""
    out = []
    for name in ("/", *(f"/{n}" for n in STATIC), "/api/info"):
        r = requests.get(v.url + name, timeout=30)
        assert r.status_code == 200, name
        out.append(r.content + json.dumps(dict(r.headers)).encode())
    return out


def test_the_key_goes_upstream_and_never_to_the_browser(viewer, upstream):
    r = _post(viewer, files={"image": ("cat.png", b"\x89PNG...", "image/png")}, data={"method": "gradcam"})
    assert r.status_code == 200 and r.json() == {"predictions": []}
    (seen,) = upstream.seen
    assert seen["path"] == "/predictions/unioncam"
    assert seen["headers"]["Authorization"] == f"Bearer {KEY}"
    assert seen["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="method"' in seen["body"] and b"\x89PNG..." in seen["body"]  # the form, untouched
    assert r.headers["X-Batch-Size"] == "1"
    r2 = _post(viewer, "/api/explanations", data=b"x", headers={"Content-Type": "image/png"})
    assert upstream.seen[-1]["path"] == "/explanations/unioncam" and r2.status_code == 200
    served = [r.content, json.dumps(dict(r.headers)).encode(), r2.content, *_everything_served(viewer)]
    assert not any(KEY.encode() in s for s in served)
    assert not any(b"Authorization" in s for s in served)


def test_the_page_is_package_data_and_names_no_other_host(viewer):
    for name, ctype in STATIC.items():
        shipped = resources.files("unioncam.serve").joinpath("viewer", name).read_bytes()
        r = requests.get(f"{viewer.url}/{name}", timeout=30)
        assert r.content == shipped and r.headers["Content-Type"] == ctype
        assert b"http://" not in shipped and b"https://" not in shipped  # no CDN, no network at run time
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert requests.get(viewer.url + "/", timeout=30).content.startswith(b"<!doctype html>")
    assert requests.get(viewer.url + "/api/info", timeout=30).json() == INFO
    r = requests.get(viewer.url + "/../pyproject.toml", timeout=30)
    assert r.status_code == 404 and "no page" in r.json()["message"]


def test_a_renewed_key_is_used_on_the_next_request(viewer, upstream, tmp_path):
    _post(viewer, data=b"x")
    _write_key(tmp_path / "key_file.json", "the-renewed-key")  # what `unioncam token` does
    _post(viewer, data=b"x")
    assert [s["headers"]["Authorization"] for s in upstream.seen] == [f"Bearer {KEY}", "Bearer the-renewed-key"]


@pytest.mark.parametrize("origin", ["http://evil.example", "null", f"http://127.0.0.1:{free_port()}", None])
def test_posts_not_from_the_page_are_refused(viewer, upstream, origin):
    r = _post(viewer, origin=origin, data=b"x")
    assert r.status_code == 403
    assert "Only the viewer's own page" in r.json()["message"]
    assert upstream.seen == []  # nothing reached TorchServe


def test_localhost_is_the_same_page(viewer, upstream):
    port = viewer.port
    r = requests.post(f"http://localhost:{port}/api/predictions", data=b"x", timeout=30,
                      headers={"Origin": f"http://localhost:{port}"})
    assert r.status_code == 200 and len(upstream.seen) == 1


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "127.0.0.1"])
def test_another_host_name_is_refused(viewer, upstream, host):
    host = host.format(port=viewer.port)
    for method in ("GET", "POST"):
        conn = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=30)
        conn.request(method, "/api/predictions" if method == "POST" else "/", body=b"x" if method == "POST" else None,
                     headers={"Host": host, "Origin": viewer.url})
        r = conn.getresponse()
        assert r.status == 403, method
        assert "DNS-rebinding" in json.loads(r.read())["message"]
        conn.close()
    assert upstream.seen == []


def test_upstream_down_is_a_502_sentence(tmp_path):
    _write_key(tmp_path / "key_file.json", KEY)
    with Viewer(f"http://127.0.0.1:{free_port()}", tmp_path / "key_file.json", INFO) as v:
        r = _post(v, data=b"x")
    assert r.status_code == 502
    msg = r.json()["message"]
    assert msg.startswith("TorchServe at http://127.0.0.1:") and "still running" in msg


def test_a_missing_key_file_is_a_sentence(tmp_path, upstream):
    with Viewer(upstream.url, tmp_path / "key_file.json", INFO) as v:
        r = _post(v, data=b"x")
    assert r.status_code == 503 and "cannot read the server's key" in r.json()["message"]
    assert upstream.seen == []


def test_status_retry_after_and_body_pass_through(viewer, upstream):
    body = b'{"code": 503, "error": {"field": "server", "problem": "is busy", "accepted": "a retry"}, "message": "m"}'
    upstream.reply = (503, {"Content-Type": "application/json", "Retry-After": "17", "Set-Cookie": "x=1",
                            "Server": "fake"}, body)
    r = _post(viewer, "/api/explanations", data=b"x")
    assert r.status_code == 503 and r.headers["Retry-After"] == "17" and r.content == body
    assert "Set-Cookie" not in r.headers  # only the headers that matter pass
    upstream.reply = (400, {"Content-Type": "application/json"}, b'{"code": 400, "type": "InvalidKeyException"}')
    r = _post(viewer, "/api/explanations", data=b"x")
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    upstream.reply = (200, {"Content-Type": "image/png"}, b"\x89PNG\r\n")
    r = _post(viewer, "/api/explanations", data=b"x")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png" and r.content == b"\x89PNG\r\n"


def test_an_oversize_body_is_refused_unread(viewer, upstream):
    with socket.create_connection(("127.0.0.1", viewer.port), timeout=30) as s:
        head = (f"POST /api/predictions HTTP/1.1\r\nHost: 127.0.0.1:{viewer.port}\r\nOrigin: {viewer.url}\r\n"
                f"Content-Type: image/png\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n")
        s.sendall(head.encode())  # the body never comes: the answer must not wait for it
        r = http.client.HTTPResponse(s)
        r.begin()
        assert r.status == 413
        assert "at most 16 MiB" in json.loads(r.read())["message"]
    r = _post(viewer, data=b"\0" * MAX_BODY)  # exactly the limit passes
    assert r.status_code == 200 and len(upstream.seen[-1]["body"]) == MAX_BODY


def test_unknown_api_and_missing_length_are_refused(viewer, upstream):
    assert _post(viewer, "/api/metrics", data=b"x").status_code == 404
    conn = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=30)
    conn.putrequest("POST", "/api/predictions")
    conn.putheader("Origin", viewer.url)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"1\r\nx\r\n0\r\n\r\n")
    assert conn.getresponse().status == 411
    conn.close()
    assert upstream.seen == []


def test_info_comes_from_the_archive(tmp_path):
    from unioncam.serve.archive import ArchiveSettings, build_archive

    mar = build_archive(ArchiveSettings(weights="random", image_size=48, method="gradcam", theta=20.0), tmp_path, "m")
    info = archive_info(mar, "m")
    assert info["model"] == "m" and info["image_size"] == 48 and info["method"] == "gradcam" and info["theta"] == 20.0
    assert info["architecture"] == "vgg16"
    assert "unioncam" in info["methods"] and "unioncam" in info["masked"] and "gradcam" not in info["masked"]


def test_serve_names_a_busy_viewer_port_first(tmp_path, capsys):
    from unioncam.cli import main

    base = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        rc = main(["serve", "--viewer-port", str(busy), "--port", str(base), "--weights", "random",
                   "--image-size", "32", "--model-store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"viewer {busy}" in err and "--viewer-port" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()
