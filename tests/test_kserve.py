"""KServe's own model server (``unioncam serve --backend kserve``), run as a user runs it, on 127.0.0.1.

One server per module (the shapes CNN, strict fp32, a test delay on masked explanations so two can be made to
overlap): every route with plain HTTP and with KServe's own client, the maps against ``unioncam.explain``,
the same JSON as the TorchServe handler gives for the same request, the TorchServe path's malformed-request
fuzz, the slots' 503, the key and its renewal, the browser page's proxy, what listens, and a graceful stop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("kserve")
requests = pytest.importorskip("requests")
pytestmark = pytest.mark.server

from unioncam.serve.runs import free_port  # noqa: E402

from . import test_server_fuzz as fuzz  # noqa: E402
from .fakes import ready_lines  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAME = "unioncam"
PNG = (ROOT / "samples" / "shapes" / "cross.png").read_bytes()
B64 = base64.b64encode(PNG).decode()
#: Seconds every masked explanation holds its slot on top of its work (the service's test hook).
DELAY_S = 1.0


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, run: Path, viewer: str, lines: list[str]) -> None:
        self.proc, self.url, self.run, self.viewer, self.lines = proc, url, run, viewer, lines

    def key(self) -> str:
        return json.loads((self.run / "key_file.json").read_text())["inference"]["key"]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key()}"}

    def post(self, path: str, body, **kw) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {**self.headers(), **kw.pop("headers", {})}
        return requests.post(self.url + path, data=data, headers=headers, timeout=120, **kw)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp), UNIONCAM_SERVE_TEST_DELAY_S=str(DELAY_S))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kserve")
    (tmp / "tmp").mkdir()
    port, viewer_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "unioncam", "serve", "--backend", "kserve", "--model", "shapes", "--weights",
           "shipped", "--precision", "fp32", "--port", str(port), "--viewer-port", str(viewer_port),
           "--runs", str(tmp / "runs"), "--run-name", "r"]
    proc = subprocess.Popen(cmd, cwd=tmp, env=_env(tmp / "tmp"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        lines = ready_lines(proc, 180)
        # Drain the log so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield Server(proc, f"http://127.0.0.1:{port}", tmp / "runs" / "r", f"http://127.0.0.1:{viewer_port}", lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def reference(server):
    """The library on the same model folder: the network, and the TorchServe handler in-process."""
    import yaml

    from unioncam.models import load_model
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    from .fakes import FakeContext

    import shutil

    # A copy: the handler's workers pool (slots) is keyed by its folder, and this one is not the server's.
    model_dir = shutil.copytree(server.run / "model", server.run.parent / "reference-model")
    ctx = FakeContext(model_dir, [])
    ctx.model_yaml_config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    handler = UnionCAMHandler()
    handler.initialize(ctx)
    return load_model("shapes", str(Path(model_dir) / "shapes.pth")), handler


def _map(answer: dict):
    import torch

    m = answer["map"]
    return torch.frombuffer(bytearray(base64.b64decode(m["data"])), dtype=torch.float16).reshape(m["shape"])


def _library_map(model, method: str = "unioncam"):
    import unioncam

    px = unioncam.to_pixels(unioncam.decode_image(PNG), size=64)
    return unioncam.explain(model, px, method=method, precision="fp32").saliency.half()


def _untimed(doc):
    """An answer without its timing fields (``timings``, ``details.seconds``; v2 outputs' JSON strings decoded)."""
    if isinstance(doc, dict):
        return {k: _untimed(v) for k, v in doc.items() if k not in ("timings", "seconds")}
    if isinstance(doc, list):
        return [_untimed(v) for v in doc]
    if isinstance(doc, str) and doc[:1] in "{[":
        try:
            return _untimed(json.loads(doc))
        except ValueError:
            return doc
    return doc


def _same(got, want, where: str = "answer") -> None:
    """Equal JSON, apart from float rounding: the server's replicas run on fewer threads than this process,
    so a sum may run in another order (probabilities to 1e-5, map values to a float16 step)."""
    import torch

    if isinstance(want, dict) and set(want) == {"dtype", "byteorder", "shape", "data"}:
        assert got["shape"] == want["shape"] and got["dtype"] == want["dtype"], where
        g, w = _map({"map": got}).float(), _map({"map": want}).float()
        assert torch.allclose(g, w, atol=2e-3, rtol=0), (where, (g - w).abs().max())
        return
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), where
    else:
        assert got == want, where


def test_start_up_names_the_routes_and_a_key(server):
    text = "".join(server.lines)
    assert f"{server.url}/v1/models/{NAME}:explain" in text and "/v2/models/unioncam/infer" in text
    keys = json.loads((server.run / "key_file.json").read_text())
    assert set(keys) == {"management", "inference", "API"}  # TorchServe's form
    assert keys["inference"]["key"] in text and keys["inference"]["expiration time"].endswith("Z")
    assert (server.run / "backend").read_text().strip() == "kserve"


def test_every_route_answers_over_plain_http(server, reference):
    model, _ = reference
    get = {
        "/v1/models": {"models": [NAME]},
        f"/v1/models/{NAME}": {"name": NAME, "ready": True},
        "/v2/health/live": {"live": True},
        "/v2/health/ready": {"ready": True},
        f"/v2/models/{NAME}/ready": {"name": NAME, "ready": True},
    }
    for path, want in get.items():
        r = requests.get(server.url + path, headers=server.headers(), timeout=10)
        assert r.status_code == 200 and r.json() == want, (path, r.text)
    meta = requests.get(f"{server.url}/v2/models/{NAME}", headers=server.headers(), timeout=10)
    assert meta.status_code == 200 and meta.json()["name"] == NAME
    ref = _library_map(model)
    r = server.post(f"/v1/models/{NAME}:predict", {"instances": [{"image": {"b64": B64}}]})
    assert r.status_code == 200 and r.json()["predictions"][0][0]["class_name"] == "cross", r.text
    r = server.post(f"/v1/models/{NAME}:explain", {"instances": [{"image": {"b64": B64}}]})
    assert r.status_code == 200, r.text
    assert (_map(r.json()["explanations"][0]) == ref).all()
    v2 = {"id": "a1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]}
    r = server.post(f"/v2/models/{NAME}/infer", v2)
    assert r.status_code == 200 and r.json()["id"] == "a1", r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "predictions" and json.loads(out["data"][0])[0]["class_name"] == "cross"
    r = server.post(f"/v2/models/{NAME}/infer", {**v2, "parameters": {"explain": True}})
    out = r.json()["outputs"][0]
    assert out["name"] == "explanations" and (_map(json.loads(out["data"][0])) == ref).all()
    # No KServe server has a v2 explain route: the explanation is /infer's.
    assert server.post(f"/v2/models/{NAME}/explain", v2).status_code == 404
    metrics = requests.get(server.url + "/metrics", timeout=10)  # Prometheus, without a key
    assert metrics.status_code == 200 and "request_explain_seconds" in metrics.text


def test_kserve_client_v1_explain_and_v2_infer(server, reference):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    model, _ = reference
    ref = _library_map(model, "gradcam")

    async def calls():
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        explained = await v1.explain(server.url, NAME, {"instances": [{"image": {"b64": B64}, "method": "gradcam"}]},
                                     headers=server.headers())
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        tensor = InferInput(name="image", shape=[1], datatype="BYTES", data=[B64])
        request = InferRequest(model_name=NAME, infer_inputs=[tensor], request_id="k1",
                               parameters={"explain": True, "method": "gradcam"})
        inferred = await v2.infer(server.url, request, model_name=NAME, headers=server.headers())
        return explained, inferred

    explained, inferred = asyncio.run(calls())
    assert (_map(explained["explanations"][0]) == ref).all()
    data = inferred.outputs[0].data
    assert inferred.id == "k1" and (_map(json.loads(data[0])) == ref).all()


@pytest.mark.parametrize("verb,body", [
    ("predict", {"instances": [{"image": {"b64": B64}}, {"image": {"b64": B64}, "target": 2}]}),
    ("explain", {"instances": [{"image": {"b64": B64}, "method": "layercam"}, {"image": B64, "target": "top2",
                                                                               "method": "gradcam"}]}),
    ("explain", {"image": B64, "method": "unioncam"}),
    ("infer", {"id": "x", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [B64, B64]}],
               "parameters": {"explain": True, "method": "xgradcam", "target": 1}}),
    ("infer", {"id": "y", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]}),
])
def test_the_same_request_gets_the_same_json_as_on_the_torchserve_path(server, reference, verb, body):
    from .fakes import FakeContext

    _, handler = reference
    path = f"/v2/models/{NAME}/infer" if verb == "infer" else f"/v1/models/{NAME}:{verb}"
    got = server.post(path, body)
    assert got.status_code == 200, got.text
    ctx = FakeContext(Path("."), [{"explain": "True"} if verb == "explain" else {}])
    want = handler.handle([{"body": body}], ctx)[0]
    assert ctx.status == {}
    got = {k: v for k, v in got.json().items() if v is not None}  # KServe's v2 schema adds null fields
    if verb == "infer":
        got["outputs"] = [{k: v for k, v in o.items() if v is not None} for o in got["outputs"]]
    _same(_untimed(got), _untimed(want))


def test_one_bad_instance_fails_alone(server):
    good = {"image": {"b64": B64}, "method": "gradcam"}
    alone = server.post(f"/v1/models/{NAME}:explain", {"instances": [good]}).json()["explanations"][0]
    rng = random.Random(7)
    for _ in range(12):
        field = rng.choice(sorted(fuzz.BAD))
        value = rng.choice([v for v in fuzz.BAD[field] if v == v])  # NaN is not JSON
        bad = dict(good, **{field: value})
        r = server.post(f"/v1/models/{NAME}:explain", {"instances": [good, bad, good]})
        assert r.status_code == 200, r.text
        first, err, third = r.json()["explanations"]
        assert err["code"] == 400 and err["error"]["field"] in ("instances[1]", field), err
        assert _untimed(first) == _untimed(alone) == _untimed(third)  # the same server: exactly


def _http(server: Server, row, headers: dict) -> requests.Response:
    """A fuzz row as the HTTP request a client would send to KServe's routes."""
    verb = "explain" if headers.get("explain") == "True" else "predict"
    extra = {k: v for k, v in headers.items() if k != "explain"}
    if not row:
        return server.post(f"/v1/models/{NAME}:{verb}", b"", headers=extra)
    if set(row) <= {"body"}:
        body = row["body"]
        if isinstance(body, (dict, list, int, float, bool)) or body is None:
            body = json.dumps(body)
        elif isinstance(body, bytes) and body[:1] not in (b"{", b"["):
            extra.setdefault("Content-Type", "image/png")  # an image file: KServe decodes other bodies as JSON
        return server.post(f"/v1/models/{NAME}:{verb}", body, headers=extra)
    files = {k: (k, v if isinstance(v, bytes) else str(v).encode()) for k, v in row.items()}
    return requests.post(f"{server.url}/v1/models/{NAME}:{verb}", files=files, headers=server.headers(), timeout=60)


def test_the_torchserve_fuzz_against_the_native_server(server):
    """The TorchServe path's malformed requests, over HTTP: each a 4xx JSON naming a field; good ones unchanged."""
    rng = random.Random(20261207)
    alone = server.post(f"/v1/models/{NAME}:predict", {"instances": [{"image": {"b64": fuzz.B64}}]})
    expected = alone.json()["predictions"][0]
    counts = {"malformed": 0, "good": 0}
    for _ in range(240):
        if rng.random() < 0.2:
            row, hdr, kind = fuzz._good(rng)
            if kind == "gradcam":
                continue  # a multipart form: KServe's routes take JSON
        else:
            (row, hdr), kind = fuzz._malformed(rng), None
        r = _http(server, row, hdr)
        if kind is None:
            counts["malformed"] += 1
            assert 400 <= r.status_code < 500, (repr(row)[:300], r.status_code, r.text[:300])
            doc = r.json()
            assert doc["code"] == r.status_code and doc["error"]["field"] and doc["message"], doc
        else:
            counts["good"] += 1
            assert r.status_code == 200, r.text[:300]
            doc = r.json()["predictions"]
            got = doc[0] if kind == "predict-v1" else doc
            assert [p["class"] for p in got] == [p["class"] for p in expected]
            assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in expected], rel=1e-4)
    assert counts["malformed"] > 150 and counts["good"] > 20


def test_past_the_slots_an_explanation_gets_503_with_retry_after(server):
    body = {"instances": [{"image": {"b64": B64}, "method": "unioncam"}]}
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(r=server.post(f"/v1/models/{NAME}:explain", body)))
    thread.start()
    time.sleep(0.4)  # the first holds the one slot for DELAY_S at least
    busy = server.post(f"/v1/models/{NAME}:explain", body)
    pred = server.post(f"/v1/models/{NAME}:predict", {"instances": [{"image": {"b64": B64}}]})
    thread.join()
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1, busy.text
    assert busy.json()["error"]["field"] == "server"
    assert pred.status_code == 200  # predictions find the other replica
    assert first["r"].status_code == 200


def test_a_key_is_needed_and_unioncam_token_renews_it(server):
    body = {"instances": [{"image": {"b64": B64}}]}
    path = f"{server.url}/v1/models/{NAME}:predict"
    assert requests.post(path, json=body, timeout=30).status_code == 401
    assert requests.post(path, json=body, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    old = server.key()
    out = subprocess.run([sys.executable, "-m", "unioncam", "token", "--runs", str(server.run.parent), "--run-name",
                          "r"], capture_output=True, text=True, env=_env(server.run.parent), timeout=120)
    assert out.returncode == 0, out.stderr
    new = server.key()
    assert new != old and new in out.stdout
    assert requests.post(path, json=body, headers={"Authorization": f"Bearer {old}"}, timeout=30).status_code == 401
    assert requests.post(path, json=body, headers={"Authorization": f"Bearer {new}"}, timeout=30).status_code == 200


def test_an_oversize_body_gets_413(server):
    r = server.post(f"/v1/models/{NAME}:predict", b"{" + b" " * (16 * 1024 * 1024 + 10) + b"}")
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_the_browser_page_works_against_it(server):
    origin = {"Origin": server.viewer}
    info = requests.get(server.viewer + "/api/info", timeout=10).json()
    assert info["architecture"] == "shapes" and info["image_size"] == 64
    files = {"image": ("cross.png", PNG, "image/png"), "method": (None, "gradcam")}
    r = requests.post(server.viewer + "/api/explanations", files=files, headers=origin, timeout=60)
    assert r.status_code == 200 and r.json()["method"] == "gradcam", r.text[:300]
    r = requests.post(server.viewer + "/api/predictions", files={"image": ("c.png", PNG, "image/png")},
                      headers=origin, timeout=60)
    assert r.status_code == 200 and r.json()["predictions"][0]["class_name"] == "cross", r.text[:300]
    r = requests.post(server.viewer + "/api/explanations", files={"image": ("c.png", PNG, "image/png"),
                                                                  "method": (None, "magiccam")},
                      headers=origin, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["field"] == "method"


def test_nothing_listens_beyond_loopback(server):
    import psutil

    listening = [c.laddr for c in psutil.Process(server.proc.pid).connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening


def test_sigterm_stops_it_gracefully_and_frees_the_port(server):
    port = int(server.url.rsplit(":", 1)[1])
    slow: dict = {}
    body = {"instances": [{"image": {"b64": B64}, "method": "unioncam"}]}
    thread = threading.Thread(target=lambda: slow.update(r=server.post(f"/v1/models/{NAME}:explain", body)))
    thread.start()
    time.sleep(0.4)
    os.kill(server.proc.pid, signal.SIGTERM)
    thread.join(60)
    assert slow["r"].status_code == 200  # the request in flight was answered
    assert server.proc.wait(60) == 0
    import socket

    with socket.socket() as s:  # nothing listens on the port any more (closed connections may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_kserve_only_options_are_refused_with_torchserve():
    from unioncam.cli import build_parser

    for extra in (["--host", "0.0.0.0"], ["--no-auth"], ["--model-dir", "x"]):
        args = build_parser().parse_args(["serve", *extra])
        with pytest.raises(ValueError, match=extra[0]):
            args.func(args)
