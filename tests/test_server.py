"""The TorchServe service end to end, against a real TorchServe on 127.0.0.1 (one per module).

The archive holds a seeded random VGG16 at 32×32 so every request is cheap on a CPU; maps are compared
with ``unioncam.explain`` run here on the same bytes through the same decode + resize path.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unioncam
from unioncam.serve.archive import ArchiveSettings, build_archive, package_digest
from unioncam.serve.torchserve.server import Ports, TorchServe, config_text

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.server

SIZE = 32
NAME = "unioncam"
ROOT = Path(__file__).resolve().parent.parent


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _photo(seed: int = 0, size: int = 48) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(3, size // 8, size // 8, generator=g) * 255).byte()
    return Image.fromarray(t.permute(1, 2, 0).numpy()).resize((size, size), Image.Resampling.BICUBIC)


GOOD = _png(_photo(0))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    # One worker with all the cores, as this test process has: maps are then bit-identical to in-process ones
    # (a worker with fewer threads sums in another order). Batches of 4 to test per-request answers.
    settings = ArchiveSettings(weights="random", seed=0, image_size=SIZE, method="unioncam", batch_size=64,
                               max_batch_size=4, max_batch_delay_ms=100, response_timeout_s=120, workers=1)
    build_archive(settings, base / "model_store", NAME)
    config = base / "config.properties"
    config.write_text(config_text(Ports.free(), max_request_mb=1))
    ts = TorchServe(model_store=base / "model_store", run_dir=base / "run", models={NAME: f"{NAME}.mar"},
                    config=config)
    ts.start(timeout=240)
    try:
        # TorchServe falls back to its own handlers silently when ours fails to import: make sure it did not.
        log = (ts.log_dir / "model_log.log").read_text()
        assert "unioncam handler ready" in log, ts.log_tail()
        line = next(x for x in log.splitlines() if "unioncam handler ready" in x)
        assert str(ts.run_dir / "tmp") in line, f"worker did not import the archived engine: {line}"
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def model():
    return unioncam.load_vgg16("random", seed=0)


def _post(ts, path, token=True, **kw):
    headers = dict(kw.pop("headers", {}))
    if token:
        headers.update(ts.headers())
    return requests.post(f"{ts.url}{path}", headers=headers, timeout=120, **kw)


def _map(body: dict) -> torch.Tensor:
    m = body["map"]
    assert m["dtype"] == "float16"
    raw = base64.b64decode(m["data"])
    return torch.frombuffer(bytearray(raw), dtype=torch.float16).reshape(m["shape"])


def _reference(model, data: bytes, method="unioncam", target=None, theta=10.0) -> unioncam.Explanation:
    px = unioncam.to_pixels(unioncam.decode_image(data), size=SIZE)
    return unioncam.explain(model, px, method=method, target=target, theta=theta)


def _assert_same(body: dict, ref: unioncam.Explanation) -> None:
    assert body["class"] == ref.target
    assert body["method"] == ref.method
    assert body["score"] == pytest.approx(ref.score, rel=1e-5)
    got, want = _map(body), ref.saliency.to(torch.float16)
    # Same engine, same pixels, same CPU: the float16 wire map is bit-identical to the library's.
    assert got.shape == want.shape
    assert torch.equal(got, want), (got.float() - want.float()).abs().max().item()


def _is_error(r, field: str, code: int = 400) -> dict:
    assert r.status_code == code, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["field"] == field, body
    return body


# ------------------------------------------------------------------------------------ round trips


def test_prediction_forms_agree_with_the_model(server, model):
    px = unioncam.to_pixels(unioncam.decode_image(GOOD), size=SIZE)
    with torch.no_grad():
        probs = model(px[None]).softmax(-1)[0]
    top = probs.topk(5)
    b64 = base64.b64encode(GOOD).decode()
    raw = _post(server, f"/predictions/{NAME}", data=GOOD).json()["predictions"]
    form = _post(server, f"/predictions/{NAME}", files={"image": GOOD}).json()["predictions"]
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # as `base64` prints it
    js = _post(server, f"/predictions/{NAME}", json={"image": wrapped}).json()["predictions"]
    v1 = _post(server, f"/v1/models/{NAME}:predict", json={"instances": [{"image": {"b64": b64}}]}).json()
    v2 = _post(server, f"/v2/models/{NAME}/infer",
               json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}).json()
    assert [p["class"] for p in raw] == top.indices.tolist()
    assert [p["probability"] for p in raw] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert raw[0]["class_name"] == model.categories[raw[0]["class"]]
    assert form == raw and js == raw
    assert v1["predictions"] == [raw]
    assert json.loads(v2["outputs"][0]["data"][0]) == raw


@pytest.fixture(scope="module")
def unioncam_body(server):
    """One UnionCAM explanation (the archive's default method), shared: each costs ~500 forwards."""
    r = _post(server, f"/explanations/{NAME}", data=GOOD)
    assert r.status_code == 200, r.text
    return r.json()


def test_unioncam_json_map_equals_explain(unioncam_body, model):
    body = unioncam_body
    ref = _reference(model, GOOD)
    _assert_same(body, ref)
    d = body["details"]
    assert d["selected"] == ref.details["selected"] and d["theta"] == 10.0
    assert d["masked_forwards"] == ref.details["masked_forwards"]
    assert set(body["timings"]) >= {"decode_ms", "explain_ms", "encode_ms"}


def test_explanation_forms_and_options(server, model):
    b64 = base64.b64encode(GOOD).decode()
    ref = _reference(model, GOOD, method="gradcam", target=7)
    form = _post(server, f"/explanations/{NAME}", files={"image": GOOD},
                 data={"method": "gradcam", "target": "7"}).json()
    js = _post(server, f"/explanations/{NAME}", json={"image": b64, "method": "gradcam", "target": 7}).json()
    v1 = _post(server, f"/v1/models/{NAME}:explain",
               json={"instances": [{"image": {"b64": b64}, "method": "gradcam", "target": 7}]}).json()
    v2 = _post(server, f"/v2/models/{NAME}/explain",
               json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                     "parameters": {"method": "gradcam", "target": 7}}).json()
    # KServe's servers have no v2 explain route: a v2 client explains through /infer, on either backend.
    v2i = _post(server, f"/v2/models/{NAME}/infer",
                json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                      "parameters": {"explain": True, "method": "gradcam", "target": 7}}).json()
    assert v2i["outputs"][0]["name"] == "explanations"
    for body in (form, js, v1["explanations"][0], json.loads(v2["outputs"][0]["data"][0]),
                 json.loads(v2i["outputs"][0]["data"][0])):
        _assert_same(body, ref)
    # θ reaches the engine: a different θ gives UnionCAM's denoise step a different threshold.
    t50 = _post(server, f"/explanations/{NAME}", json={"image": b64, "theta": 50}).json()
    assert t50["details"]["theta"] == 50.0
    _assert_same(t50, _reference(model, GOOD, theta=50.0))


def test_png_overlay_decodes(server, model):
    r = _post(server, f"/explanations/{NAME}", files={"image": GOOD}, data={"method": "layercam", "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size == (SIZE, SIZE) and img.mode == "RGB"
    px = unioncam.to_pixels(unioncam.decode_image(GOOD), size=SIZE)
    want = unioncam.overlay(px, _reference(model, GOOD, method="layercam").saliency)
    diff = (torch.from_numpy(np.array(img)).int() - torch.from_numpy(np.array(want)).int()).abs()
    assert diff.max().item() <= 2  # one float16-rounded map value changes a colour by at most a step


# ------------------------------------------------------------------------------------- bad inputs


def _bomb() -> bytes:
    # 20000×20000 one-bit PNG of zeros: a few kB on the wire, 400 M pixels once decoded.
    return _png(Image.new("1", (20000, 20000)))


def _truncated_jpeg() -> bytes:
    data = _jpeg(_photo(1, 64))
    return data[: len(data) // 2]


BAD = [
    ("empty body", dict(data=b""), "image"),
    ("not an image", dict(data=b"hello, this is not an image"), "image"),
    ("truncated jpeg", dict(data=_truncated_jpeg()), "image"),
    ("1x1 image", dict(data=_png(Image.new("RGB", (1, 1)))), "image"),
    ("decompression bomb", dict(data=_bomb()), "image"),
    ("target -1", dict(files={"image": GOOD}, data={"target": "-1", "method": "gradcam"}), "target"),
    ("target 1000", dict(json={"image": base64.b64encode(GOOD).decode(), "target": 1000}), "target"),
    ("target cat", dict(files={"image": GOOD}, data={"target": "cat"}), "target"),
    ("theta 101", dict(json={"image": base64.b64encode(GOOD).decode(), "theta": 101}), "theta"),
    ("theta x", dict(files={"image": GOOD}, data={"theta": "x"}), "theta"),
    ("unknown method", dict(files={"image": GOOD}, data={"method": "magiccam"}), "method"),
    ("unknown format", dict(files={"image": GOOD}, data={"format": "gif", "method": "gradcam"}), "format"),
    ("bad base64", dict(json={"image": "not base64 !!"}), "image"),
    ("unknown option", dict(files={"image": GOOD}, data={"colour": "red"}), "options"),
]


@pytest.fixture(scope="module")
def good_gradcam(server):
    body = _post(server, f"/explanations/{NAME}", files={"image": GOOD}, data={"method": "gradcam"}).json()
    return body["map"]["data"]


@pytest.mark.parametrize("what,kw,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_the_next_request_is_served(server, good_gradcam, what, kw, field):
    body = _is_error(_post(server, f"/explanations/{NAME}", **kw), field)
    assert body["code"] == 400 and body["error"]["accepted"]
    after = _post(server, f"/explanations/{NAME}", files={"image": GOOD}, data={"method": "gradcam"})
    assert after.status_code == 200 and after.json()["map"]["data"] == good_gradcam


def test_bad_input_on_predictions_too(server):
    _is_error(_post(server, f"/predictions/{NAME}", data=b"GIF89a broken"), "image")


def test_oversize_body_is_refused(server, good_gradcam):
    r = _post(server, f"/explanations/{NAME}", data=os.urandom(2 * 1024 * 1024))  # limit is 1 MiB here
    # TorchServe's HTTP layer refuses it before any handler runs: 413 Request Entity Too Large, no body.
    assert r.status_code == 413, r.text
    after = _post(server, f"/explanations/{NAME}", files={"image": GOOD}, data={"method": "gradcam"})
    assert after.json()["map"]["data"] == good_gradcam


def _modes() -> dict[str, bytes]:
    rgb = _photo(2, 40)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    i16 = Image.fromarray((torch.arange(40 * 40).reshape(40, 40) * 40).to(torch.int32).numpy().astype("uint16"))
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, format="JPEG")
    return {"RGBA": _png(rgba), "P": _png(rgb.convert("P", palette=Image.Palette.ADAPTIVE)), "I;16": _png(i16),
            "CMYK": cmyk.getvalue()}


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "CMYK"])
def test_other_image_modes_are_converted_to_rgb(server, model, mode):
    data = _modes()[mode]
    assert Image.open(io.BytesIO(data)).mode == mode
    r = _post(server, f"/explanations/{NAME}", files={"image": data}, data={"method": "gradcam"})
    assert r.status_code == 200, r.text
    _assert_same(r.json(), _reference(model, data, method="gradcam"))


# ---------------------------------------------------------------------------------- batches and load


def test_a_batch_mixing_predictions_explanations_and_errors(server, model, good_gradcam):
    b64 = base64.b64encode(GOOD).decode()
    calls = [
        ("/predictions", dict(data=GOOD)),
        ("/explanations", dict(json={"image": b64, "method": "gradcam"})),
        ("/explanations", dict(json={"image": b64, "method": "gradcam", "target": "cat"})),
        ("/predictions", dict(data=b"not an image")),
    ]
    for _ in range(3):  # TorchServe forms batches by timing: retry until one held all four
        barrier = threading.Barrier(len(calls))

        def go(call):
            barrier.wait()
            return _post(server, f"{call[0]}/{NAME}", **call[1])

        with ThreadPoolExecutor(len(calls)) as pool:
            rs = list(pool.map(go, calls))
        assert rs[0].status_code == 200 and "predictions" in rs[0].json()
        assert rs[1].status_code == 200 and rs[1].json()["map"]["data"] == good_gradcam
        _is_error(rs[2], "target")
        _is_error(rs[3], "image")
        if all(int(r.headers.get("X-Batch-Size", 1)) > 1 for r in rs):
            return
    pytest.fail(f"requests were never batched together: {[r.headers.get('X-Batch-Size') for r in rs]}")


def test_load_mixed_clients(server, good_gradcam):
    clients, per_client = 8, 4
    b64 = base64.b64encode(GOOD).decode()
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(c):
        for i in range(per_client):
            t0 = time.perf_counter()
            if (c + i) % 2:
                r = _post(server, f"/predictions/{NAME}", data=GOOD)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == 5
            else:
                r = _post(server, f"/explanations/{NAME}", json={"image": b64, "method": "gradcam"})
                ok = r.status_code == 200 and r.json()["map"]["data"] == good_gradcam
            with lock:
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    assert not failures, failures
    q = statistics.quantiles(latencies, n=100)
    print(f"\nload: {clients} clients × {per_client} requests, 0 failures, "
          f"p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms")


def test_metrics_on_the_prometheus_endpoint(server, unioncam_body):
    # unioncam_body made a UnionCAM request: it fills the UnionCAM-only metrics too.
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    for name in ("ExplanationLatency", "MaskedForwards", "PrunedChannels", "SelectedMap"):
        assert any(line.startswith(name + "{") for line in text.splitlines()), name


# ------------------------------------------------------------------------------- security, recovery


def test_requests_without_the_token_are_refused(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.post(f"{server.url}/predictions/{NAME}", data=GOOD, headers=headers, timeout=30)
        assert r.status_code in (400, 401, 403) and "Token" in r.json()["message"]
    r = requests.get(f"{server.management_url}/models", timeout=30)
    assert r.status_code in (400, 401, 403)


def _worker_pid(ts) -> int:
    r = requests.get(f"{ts.management_url}/models/{NAME}", headers=ts.headers("management"), timeout=30)
    workers = [w for w in r.json()[0]["workers"] if w["status"] == "READY"]
    return int(workers[0]["pid"]) if workers else -1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_worker_memory_is_flat_over_hundreds_of_requests(server):
    pid = _worker_pid(server)
    b64 = base64.b64encode(GOOD).decode()

    def burst(n):
        with ThreadPoolExecutor(8) as pool:  # enough clients to fill batches: no waiting on the batch delay
            rs = list(pool.map(lambda i: _post(server, f"/predictions/{NAME}", data=GOOD) if i % 8 else
                               _post(server, f"/explanations/{NAME}", json={"image": b64, "method": "gradcam"}),
                               range(n)))
        assert all(r.status_code == 200 for r in rs)

    burst(40)  # warm-up: allocator pools and caches reach their steady size
    before = _rss_mb(pid)
    burst(200)
    after = _rss_mb(pid)
    print(f"\nworker RSS: {before:.0f} MB after warm-up, {after:.0f} MB after 200 more requests")
    assert _worker_pid(server) == pid
    assert after - before < 40, (before, after)


def test_a_killed_worker_is_replaced(server, good_gradcam):
    pid = _worker_pid(server)
    os.kill(pid, 9)
    deadline = time.monotonic() + 120
    new = -1
    while time.monotonic() < deadline:
        new = _worker_pid(server)
        if new not in (-1, pid):
            break
        time.sleep(0.5)
    assert new not in (-1, pid), "no new worker"
    r = _post(server, f"/explanations/{NAME}", files={"image": GOOD}, data={"method": "gradcam"})
    assert r.status_code == 200 and r.json()["map"]["data"] == good_gradcam


# ----------------------------------------------------------------------------------------- archive


def test_archive_is_self_contained_and_tiny(server):
    mar = server.model_store / f"{NAME}.mar"
    names = zipfile.ZipFile(mar).namelist()
    assert {"unioncam_handler.py", "unioncam/api.py", "unioncam/serve/torchserve/handler.py",
            "unioncam/serve/service.py", "unioncam/kernels/__init__.py",
            "unioncam/serve/torchserve/config.properties", "index_to_name.json",
            "model-config.yaml", "MAR-INF/MANIFEST.json"} <= set(names)
    assert not any(n.endswith((".pth", ".pt")) for n in names)  # random weights: the seed only
    assert mar.stat().st_size < 1_000_000
    z = zipfile.ZipFile(mar)
    import yaml

    cfg = yaml.safe_load(z.read("model-config.yaml"))
    assert cfg["handler"].pop("engine") == f"unioncam {unioncam.__version__} ({package_digest()})"
    assert cfg["handler"] == {"model": "vgg16", "image_size": SIZE, "method": "unioncam", "theta": 10.0,
                              "layer": None, "batch_size": 64, "precision": "auto", "device": "cpu",
                              "explain_slots": None, "explain_wait_s": 0.0,
                              "explained_layer": "features.29", "channels": 512, "forward_gflops": 0.874,
                              "weights": "random", "seed": 0}
    assert cfg["batchSize"] == 4 and cfg["maxBatchDelay"] == 100 and cfg["responseTimeout"] == 120
    names_map = json.loads(z.read("index_to_name.json"))
    assert len(names_map) == 1000 and names_map["0"] == unioncam.imagenet_categories()[0]
