"""Hostile and ordinary clients at once against a real TorchServe with the archive's default settings.

Bounded in time (``UNIONCAM_LOAD_SECONDS``, default 40) and in requests; every address is 127.0.0.1.
Ordinary clients must see no failure: predictions and Grad-CAM all answered, UnionCAM answered or told
to come back (``503`` + ``Retry-After``, then answered on a retry). Hostile clients get 4xx answers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import statistics
import threading
import time

import pytest
import torch
from PIL import Image

from unioncam.serve.archive import ArchiveSettings, build_archive
from unioncam.serve.torchserve.server import Ports, TorchServe, config_text

pytestmark = [pytest.mark.server, pytest.mark.slow]

SECONDS = float(os.environ.get("UNIONCAM_LOAD_SECONDS", "40"))
SIZE = 32


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(48, 48, 3, generator=g) * 255).byte().numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("load")
    settings = ArchiveSettings(weights="random", image_size=SIZE)  # the defaults: 2 workers, 1 slot, batches of 1
    build_archive(settings, base / "store", "unioncam")
    config = base / "config.properties"
    config.write_text(config_text(Ports.free(), max_request_mb=1))
    ts = TorchServe(model_store=base / "store", run_dir=base / "run", config=config)
    ts.start(timeout=240)
    yield ts
    ts.stop()


def test_hostile_clients_do_not_hurt_ordinary_ones(server):
    import requests

    auth = server.headers()
    url = server.url
    stop_at = time.monotonic() + SECONDS
    results: dict[str, list[tuple[int, float]]] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def record(kind: str, status: int, seconds: float) -> None:
        with lock:
            results.setdefault(kind, []).append((status, seconds))

    def post(path: str, timeout: float = 300, **kw):
        t0 = time.monotonic()
        r = requests.post(f"{url}{path}", headers={**auth, **kw.pop("headers", {})}, timeout=timeout, **kw)
        return r, time.monotonic() - t0

    def predictor(seed: int) -> None:
        image = _png(seed)
        while time.monotonic() < stop_at:
            r, dt = post("/predictions/unioncam", data=image)
            record("predict", r.status_code, dt)
            if r.status_code == 200 and len(r.json()["predictions"]) != 5:
                errors.append(f"predict: {r.text[:200]}")

    def explainer(method: str, seed: int) -> None:
        image = _png(seed)
        while time.monotonic() < stop_at:
            r, dt = post("/explanations/unioncam", files={"image": image}, data={"method": method})
            if r.status_code == 503 and method == "unioncam":
                retry = int(r.headers.get("Retry-After", "0"))
                record("unioncam-refused", 503 if retry >= 1 else -1, dt)
                time.sleep(min(retry, 3))  # a real client waits Retry-After; the test caps it
                continue
            record(method, r.status_code, dt)
            if r.status_code == 200 and r.json()["map"]["shape"] != [SIZE, SIZE]:
                errors.append(f"{method}: {r.text[:200]}")

    def hostile(seed: int) -> None:
        rng = random.Random(seed)
        deep = ("[" * 10_000 + "]" * 10_000).encode()
        while time.monotonic() < stop_at:
            kind = rng.randrange(5)
            if kind == 0:
                r, dt = post("/predictions/unioncam", data=deep, headers={"Content-Type": "application/json"})
            elif kind == 1:
                r, dt = post("/explanations/unioncam", data=os.urandom(rng.randrange(1, 5000)))
            elif kind == 2:
                r, dt = post("/predictions/unioncam", data=b"\0" * (2 * 1024 * 1024))  # over max_request_size
            elif kind == 3:
                body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(_png(1)).decode()}}],
                                   "parameters": [1, 2]})
                r, dt = post("/v1/models/unioncam:explain", data=body, headers={"Content-Type": "application/json"})
            else:
                r, dt = post("/predictions/unioncam", data=b'{"image": "aGVsbG8', headers={"Content-Type": "text/plain"})
            record("hostile", r.status_code, dt)

    threads = [threading.Thread(target=predictor, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=explainer, args=("gradcam", 10)),
                threading.Thread(target=explainer, args=("unioncam", 11)),
                threading.Thread(target=explainer, args=("unioncam", 12))]
    threads += [threading.Thread(target=hostile, args=(20 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 600)

    summary = {k: {"n": len(v), "statuses": sorted({s for s, _ in v}),
                   "p50_s": round(statistics.median(d for _, d in v), 3),
                   "p99_s": round(sorted(d for _, d in v)[max(0, int(0.99 * len(v)) - 1)], 3)}
               for k, v in results.items()}
    print("load summary:", json.dumps(summary))
    assert not errors, errors[:3]
    for kind in ("predict", "gradcam", "unioncam"):
        assert results.get(kind), (kind, summary)
        assert {s for s, _ in results[kind]} == {200}, (kind, summary)
    assert {s for s, _ in results.get("unioncam-refused", [])} <= {503}, summary  # always with Retry-After
    assert {s for s, _ in results["hostile"]} <= {400, 413}, summary
    assert len(results["predict"]) >= 20
    # Predictions are never stuck behind an explanation: a worker is always free for them.
    slowest_unioncam = max(d for _, d in results["unioncam"])
    assert max(d for _, d in results["predict"]) < slowest_unioncam / 2, summary
