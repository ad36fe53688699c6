"""A real TorchServe on 127.0.0.1: explanation slots that follow the live workers as the management API
scales them (2 → 3 → 1), and an archive made for a GPU (``--device cuda``) whose batch's explanations
share one ``explain_batch`` — run on this CPU, the device decision passed rather than detected.

The shipped-size ``shapes`` CNN (random weights) at 32² keeps every request cheap; a test hook
(``UNIONCAM_SERVE_TEST_DELAY_S``) makes each masked-forward explanation hold its slot a known time.
"""

from __future__ import annotations

import base64
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import unioncam
from unioncam.serve.archive import ArchiveSettings, build_archive
from unioncam.serve.service import DELAY_ENV
from unioncam.serve.torchserve.server import Ports, TorchServe, config_text

from .fakes import random_png

requests = pytest.importorskip("requests")
pytestmark = [pytest.mark.server, pytest.mark.slow]

SIZE = 32
DELAY = 3.0


def _start(base, settings: ArchiveSettings, env: dict[str, str] | None = None) -> TorchServe:
    build_archive(settings, base / "store", "unioncam")
    config = base / "config.properties"
    config.write_text(config_text(Ports.free(), max_request_mb=1))
    ts = TorchServe(model_store=base / "store", run_dir=base / "run", config=config)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})  # the frontend hands its environment to every worker it starts, later ones too
    try:
        ts.start(timeout=240)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log = (ts.log_dir / "model_log.log").read_text()
    assert "unioncam handler ready" in log, ts.log_tail()
    return ts


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    settings = ArchiveSettings(model="shapes", weights="random", image_size=SIZE, device="cpu", workers=2,
                               precision="fp32")
    ts = _start(tmp_path_factory.mktemp("scaling"), settings, {DELAY_ENV: str(DELAY)})
    yield ts
    ts.stop()


def _workers(ts: TorchServe) -> list[dict]:
    r = requests.get(f"{ts.management_url}/models/unioncam", headers=ts.headers("management"), timeout=30)
    r.raise_for_status()
    return r.json()[0]["workers"]


def _scale(ts: TorchServe, n: int) -> None:
    r = requests.put(f"{ts.management_url}/models/unioncam", headers=ts.headers("management"), timeout=240,
                     params={"min_worker": n, "max_worker": n, "synchronous": "true"})
    assert r.status_code in (200, 202), r.text
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        workers = _workers(ts)
        if len(workers) == n and all(w["status"] == "READY" for w in workers):
            pids = {w.get("pid") for w in workers}
            if len(pids) == n:
                return
        time.sleep(0.5)
    raise AssertionError(f"not {n} READY workers: {_workers(ts)}\n{ts.log_tail()}")


def _unioncam(ts: TorchServe, seed: int):
    t0 = time.monotonic()
    r = requests.post(f"{ts.url}/explanations/unioncam", headers=ts.headers(), timeout=120,
                      files={"image": random_png(seed)})
    return r, time.monotonic() - t0


def _predict(ts: TorchServe):
    t0 = time.monotonic()
    r = requests.post(f"{ts.url}/predictions/unioncam", headers=ts.headers(), data=random_png(9), timeout=120)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def _check(ts: TorchServe, workers: int) -> None:
    """Both promises with ``workers`` live workers: idle workers beyond the one kept for predictions take
    explanations; a prediction does not wait behind the explanations."""
    allowed = max(1, workers - 1)
    with ThreadPoolExecutor(allowed + 1) as pool:
        running = []
        for i in range(allowed):
            running.append(pool.submit(_unioncam, ts, 10 + i))
            time.sleep(0.4)
        time.sleep(0.6)  # every admitted one is now holding its slot (each holds it DELAY s)
        if workers >= 2:
            assert _predict(ts) < DELAY / 2  # a worker was free for it
            extra, seconds = _unioncam(ts, 20)  # one more than the slots: refused at once, with a hint
            assert extra.status_code == 503, extra.text
            assert int(extra.headers["Retry-After"]) >= 1 and seconds < DELAY / 2
        for f in running:
            r, seconds = f.result()
            assert r.status_code == 200, (workers, r.text)
            assert seconds >= DELAY
    if workers == 1:  # the only worker is never refused an explanation
        r, _ = _unioncam(ts, 21)
        assert r.status_code == 200, r.text


def test_slots_follow_scaling_through_the_management_api(scaled):
    _check(scaled, 2)
    _scale(scaled, 3)
    _check(scaled, 3)
    _scale(scaled, 1)
    time.sleep(1.0)  # the stopped workers' processes exit; their leases go with them
    _check(scaled, 1)


# --------------------------------------------------------------------------- GPU settings on a CPU


@pytest.fixture(scope="module")
def gpu_archive(tmp_path_factory):
    # An archive made for one GPU with one worker, served here on the CPU (TorchServe gives gpu_id None).
    # A long batch delay makes the test's five concurrent requests one batch.
    settings = ArchiveSettings(model="shapes", weights="random", image_size=SIZE, device="cuda", gpus=1,
                               workers_per_gpu=1, max_batch_size=8, max_batch_delay_ms=1500, precision="fp32",
                               batch_size=64)
    ts = _start(tmp_path_factory.mktemp("gpu-settings"), settings)
    yield ts
    ts.stop()


def test_a_gpu_archives_batch_shares_one_explain_batch(gpu_archive):
    ts = gpu_archive
    log = (ts.log_dir / "model_log.log").read_text()
    assert "(gpu settings)" in log and "serving on the CPU" in log, ts.log_tail()
    pngs = [random_png(seed) for seed in (1, 2, 3)]
    calls = [{"files": {"image": pngs[0]}}, {"files": {"image": pngs[1]}, "data": {"target": "3"}},
             {"files": {"image": pngs[2]}, "data": {"theta": "500"}},
             {"files": {"image": pngs[2]}, "data": {"method": "gradcam"}}, {"files": {"image": pngs[2]}}]
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda kw: requests.post(f"{ts.url}/explanations/unioncam", headers=ts.headers(),
                                                         timeout=120, **kw), calls))
    assert [r.headers.get("X-Batch-Size") for r in answers] == ["5"] * 5, [r.headers for r in answers]
    assert [r.status_code for r in answers] == [200, 200, 400, 200, 200], [r.text[:200] for r in answers]
    assert answers[2].json()["error"]["field"] == "theta"
    model = unioncam.load_model("shapes", "random", seed=0)
    for r, png, target in ((answers[0], pngs[0], None), (answers[1], pngs[1], 3), (answers[4], pngs[2], None)):
        body = r.json()
        assert body["timings"]["shared_with"] == 3
        ref = unioncam.explain(model, unioncam.to_pixels(unioncam.decode_image(png), size=SIZE), target=target,
                               precision="fp32", batch_size=64)
        m = body["map"]
        got = torch.frombuffer(bytearray(base64.b64decode(m["data"])), dtype=torch.float16).reshape(m["shape"])
        assert body["class"] == ref.target
        assert (got.float() - ref.saliency).abs().max() < 2e-3  # float16 on the wire, shared chunks
    assert answers[3].json()["method"] == "gradcam" and "shared_with" not in answers[3].json()["timings"]
