"""Serving made for a GPU, decided and tested on a CPU: the archive's device defaults, explanation requests
of one batch sharing one ``explain_batch``, slots that follow the live workers and wait on a GPU, and the
traps (no ``gpu_id``, a CUDA out-of-memory error during one request). The handler runs in-process.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import unioncam
from unioncam.serve.archive import ArchiveSettings
from unioncam.serve.limits import GPU_S_PER_GFLOP, Slots, WorkerLease, explanation_seconds, response_timeout

from .fakes import FakeContext, random_png

SIZE = 32


def _context(model_dir: Path, headers: list[dict], **handler) -> FakeContext:
    ctx = FakeContext(model_dir, headers)
    # The GPU check (benchmarks/gpu_serving.py) runs the handler tests with the handler on a GPU.
    ctx.system_properties["gpu_id"] = os.environ.get("UNIONCAM_TEST_GPU_ID")
    cfg = {"model": "shapes", "image_size": SIZE, "method": "unioncam", "theta": 10.0, "weights": "random",
           "seed": 0, "batch_size": 64, "precision": "fp32", "explain_slots": None, "device": "cuda",
           "explain_wait_s": 2.0, "channels": 128}
    cfg.update(handler)
    ctx.model_yaml_config = {"minWorkers": 1, "handler": cfg}
    return ctx


@pytest.fixture(scope="module")
def gpu_handler(tmp_path_factory):
    """A handler whose archive was made for a GPU (``device: cuda``), running on this CPU (gpu_id None) or
    on the GPU ``UNIONCAM_TEST_GPU_ID``."""
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    h.initialize(_context(tmp_path_factory.mktemp("gpu-model"), []))
    return h


def _pixels(png: bytes) -> torch.Tensor:
    return unioncam.to_pixels(unioncam.decode_image(png), size=SIZE)


def _map(body: dict) -> torch.Tensor:
    m = body["map"]
    return torch.frombuffer(bytearray(base64.b64decode(m["data"])), dtype=torch.float16).reshape(m["shape"]).float()


# ------------------------------------------------------------------------------------- defaults


def test_device_decides_the_archive_defaults():
    import yaml

    cpu = ArchiveSettings(weights="random", device="cpu")
    got = (cpu.max_batch_size, cpu.max_batch_delay_ms, cpu.workers, cpu.explain_wait, cpu.timeout)
    assert got == (1, 50, 2, 0, 736)
    assert cpu.slots == 1 and "503" in cpu.slots_text
    gpu = ArchiveSettings(weights="random", device="cuda", gpus=2)
    assert (gpu.max_batch_size, gpu.max_batch_delay_ms, gpu.workers) == (8, 10, 4)  # 2 GPUs × 2 workers
    assert gpu.slots == 1 and "per GPU" in gpu.slots_text
    # Four batches of 8 UnionCAMs at the H100's bf16 rate (82.6 ms each at 224²), at least 2 s.
    assert gpu.explain_wait == pytest.approx(4 * 8 * 0.0826, abs=0.06)
    assert gpu.timeout == 120  # 5 × a batch of 8 slowest explanations is far below the floor
    doc = yaml.safe_load(gpu.yaml())
    assert (doc["batchSize"], doc["maxBatchDelay"], doc["minWorkers"]) == (8, 10, 4)
    assert doc["handler"]["device"] == "cuda" and doc["handler"]["explain_slots"] is None
    assert ArchiveSettings(weights="random", device="cuda", gpus=1, workers_per_gpu=3).workers == 3
    with pytest.raises(unioncam.InvalidInputError):
        ArchiveSettings(weights="random", device="tpu").validate()


def test_gpu_estimate_is_the_h100_measurement():
    # VGG16 UnionCAM at 224²: 516 masked forwards of 30.94 GFLOP in 82.6 ms (bf16) / 374.9 ms (strict fp32).
    assert explanation_seconds("unioncam", 224, "cuda") == pytest.approx(0.0826, rel=1e-6)
    assert explanation_seconds("unioncam", 224, "cuda", precision="fp32") == pytest.approx(0.3749, rel=1e-6)
    assert GPU_S_PER_GFLOP["fp32"] / GPU_S_PER_GFLOP["bf16"] == pytest.approx(374.9 / 82.6)
    assert explanation_seconds("unioncam", 224) / explanation_seconds("unioncam", 224, "cuda") > 50
    assert response_timeout(224, 8, "cuda") == 120 and response_timeout(224) == 736


# ---------------------------------------------------------------------------- live workers, slots


def _lease_holders(key: str, n: int, group: str = "") -> list[subprocess.Popen]:
    """``n`` processes holding a worker's lease of ``key`` (started together, returned once all hold it)."""
    procs = [subprocess.Popen([sys.executable, "-c", (
        "import time; from unioncam.serve.limits import WorkerLease\n"
        f"lease = WorkerLease({key!r}, {group!r}); print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "held"
    return procs


def _lease_holder(key: str, group: str = "") -> subprocess.Popen:
    return _lease_holders(key, 1, group)[0]


def test_slots_follow_the_live_workers(tmp_path):
    key = str(tmp_path)
    me = WorkerLease(key)
    slots = Slots(key + ":", None, me)
    assert me.live() == 1 and slots.n == 1  # alone: one slot all the same (else nothing could explain)
    others = _lease_holders(key, 2)
    try:
        assert me.live() == 3 and slots.n == 2
        gpu = _lease_holder(key, "0")  # another GPU's worker does not count here
        assert me.live() == 3
        gpu.kill()
        gpu.wait()
        others[0].kill()  # a worker that died: its lock went with it
        others[0].wait()
        assert me.live() == 2 and slots.n == 1
        assert len(list(me.folder.glob("worker--*"))) == 2  # its stale file was removed
    finally:
        for p in others:
            p.kill()
            p.wait()
    assert me.live() == 1
    assert Slots(key, 3).n == 3  # a fixed number stays fixed


def test_cpu_threads_follow_the_live_workers(tmp_path, monkeypatch):
    """A CPU worker's threads are the cores over the live workers, refitted at each batch: after a scale
    up, down, or a worker that died; ``OMP_NUM_THREADS`` fixes them."""
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    others: list[subprocess.Popen] = []
    try:
        torch.set_num_threads(8)  # what torch takes alone on this "machine": the cores the workers share
        ctx = _context(tmp_path, [], device="cpu", explain_wait_s=0)
        ctx.model_yaml_config["minWorkers"] = 2
        h = UnionCAMHandler()
        h.initialize(ctx)
        assert h.device.type == "cpu" and torch.get_num_threads() == 4  # the archive's two workers

        def batch() -> int:
            out = h.handle([{"body": random_png(4)}], _context(tmp_path, [{}]))
            assert len(out[0]["predictions"]) == 5
            return torch.get_num_threads()

        key = f"{tmp_path}:unioncam"
        assert batch() == 8  # the other worker never came: this one has them all
        others = _lease_holders(key, 3)
        assert batch() == 2  # scaled to 4
        for p in others[:2]:
            p.kill()
            p.wait()
        assert batch() == 4  # two of them gone
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        fixed = UnionCAMHandler()
        fixed.initialize(ctx)
        fixed.handle([{"body": random_png(4)}], _context(tmp_path, [{}]))
        assert torch.get_num_threads() == 3
    finally:
        for p in others:
            p.kill()
            p.wait()
        torch.set_num_threads(before)


def test_a_waiting_explanation_gets_the_slot_when_it_frees(tmp_path):
    slots = Slots(str(tmp_path), 1, wait_s=5.0)
    released = threading.Event()

    def hold() -> None:
        with slots.acquire(seconds=0.3) as ok:
            assert ok
            released.wait(0.3)

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    with slots.acquire(seconds=0.1) as ok:
        waited = time.monotonic() - t0
    t.join()
    assert ok and 0.1 < waited < 2.0
    # Refused at once when the holder's own estimate is beyond the bound.
    short = Slots(str(tmp_path), 1, wait_s=0.5)
    t = threading.Thread(target=lambda: _hold(slots, 3.0, 0.6))
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    with short.acquire() as ok:
        assert not ok and time.monotonic() - t0 < 0.3
    assert short.estimated_wait_s > 2
    t.join()


def _hold(slots: Slots, announced: float, seconds: float) -> None:
    with slots.acquire(seconds=announced):
        time.sleep(seconds)


# ------------------------------------------------------------------------------------- the handler


def test_gpu_settings_share_one_explain_batch_and_answer_each_on_its_own(gpu_handler, monkeypatch):
    import unioncam.serve.service as handler_module

    calls = []
    real = handler_module.explain_batch
    monkeypatch.setattr(handler_module, "explain_batch",
                        lambda model, images, **kw: calls.append(len(images)) or real(model, images, **kw))
    pngs = [random_png(seed) for seed in (1, 2, 3)]
    rows = [{"image": pngs[0]}, {"image": pngs[1], "target": b"2"}, {"image": pngs[2], "theta": b"500"},
            {"image": pngs[2], "method": b"gradcam"}, {"body": pngs[0]}, {"image": pngs[2]}]
    ctx = _context(Path("."), [{"explain": "True"}] * 4 + [{}] + [{"explain": "True"}])
    out = gpu_handler.handle(rows, ctx)
    assert ctx.status == {2: 400} and out[2]["error"]["field"] == "theta"  # the bad one alone
    assert calls == [3]  # requests 0, 1 and 5: one shared call; gradcam on its own
    model = gpu_handler.model
    for idx, png, target in ((0, pngs[0], None), (1, pngs[1], 2), (5, pngs[2], None)):
        ref = unioncam.explain(model, _pixels(png), target=target, precision="fp32", batch_size=64)
        assert out[idx]["class"] == ref.target and out[idx]["timings"]["shared_with"] == 3
        # The same map to float rounding (the chunks hold other images), encoded in float16.
        assert (_map(out[idx]) - ref.saliency).abs().max() < 2e-3, idx
        assert out[idx]["details"]["selected"] == ref.details["selected"]
    assert out[3]["method"] == "gradcam" and "shared_with" not in out[3]["timings"]
    assert len(out[4]["predictions"]) == 5


def test_a_cuda_out_of_memory_is_that_requests_507_and_the_next_is_served(gpu_handler, monkeypatch):
    import unioncam.serve.service as handler_module

    real, failures = handler_module.explain, []

    def oom_once(*args, **kw):
        if not failures:
            failures.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)

    monkeypatch.setattr(handler_module, "explain", oom_once)
    ctx = _context(Path("."), [{"explain": "True"}, {}])
    out = gpu_handler.handle([{"image": random_png(4)}, {"body": random_png(4)}], ctx)
    assert ctx.status == {0: 507} and out[0]["error"]["field"] == "server"
    assert "ran out of GPU memory" in out[0]["message"] and ctx.response_headers[0]["Retry-After"] == "5"
    assert len(out[1]["predictions"]) == 5  # its batch-mate is answered
    ctx = _context(Path("."), [{"explain": "True"}])
    out = gpu_handler.handle([{"image": random_png(4)}], ctx)
    assert ctx.status == {} and out[0]["method"] == "unioncam"  # the worker serves the next one


def test_a_shared_call_that_fails_falls_back_to_each_request_alone(gpu_handler, monkeypatch):
    import unioncam.serve.service as handler_module

    def boom(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (shared chunks)")

    monkeypatch.setattr(handler_module, "explain_batch", boom)
    ctx = _context(Path("."), [{"explain": "True"}] * 2)
    out = gpu_handler.handle([{"image": random_png(5)}, {"image": random_png(6)}], ctx)
    assert ctx.status == {} and [o["method"] for o in out] == ["unioncam", "unioncam"]
    assert "shared_with" not in out[0]["timings"]


@pytest.mark.parametrize("gpu_id", [None, "absent", "0"])
def test_no_usable_gpu_id_serves_on_the_cpu_with_one_log_line(tmp_path, monkeypatch, caplog, gpu_id):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_id is None)  # None: a GPU machine without gpu_id
    ctx = _context(tmp_path, [])
    if gpu_id == "absent":
        del ctx.system_properties["gpu_id"]
    else:
        ctx.system_properties["gpu_id"] = gpu_id
    h = UnionCAMHandler()
    with caplog.at_level(logging.INFO, logger="unioncam.serve.service"):
        h.initialize(ctx)
    assert h.device == torch.device("cpu")
    notes = [r.getMessage() for r in caplog.records if "serving on the CPU" in r.getMessage()]
    assert len(notes) == 1, notes
    if gpu_id == "0":
        assert "CUDA is not available" in notes[0]
    if gpu_id in (None, "absent"):
        assert "gpu_id None" in notes[0]
        assert caplog.records[0].levelno == (logging.WARNING if gpu_id is None else logging.INFO)
    h.lease.close()


def test_gpu_settings_wait_for_a_slot_within_the_bound_and_refuse_beyond(tmp_path):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    h.initialize(_context(tmp_path, [], explain_slots=1, explain_wait_s=3.0))
    try:
        rows, headers = [{"image": random_png(7)}], [{"explain": "True"}]
        # Another worker holds the only slot and expects to be done in 0.5 s: this one waits its turn.
        t = threading.Thread(target=_hold, args=(h.slots, 0.5, 0.5))
        t.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        ctx = _context(Path("."), headers)
        out = h.handle(rows, ctx)
        t.join()
        assert ctx.status == {} and out[0]["method"] == "unioncam" and time.monotonic() - t0 > 0.3
        # It expects 20 s, beyond the 3 s bound: refused at once, told when to come back.
        t = threading.Thread(target=_hold, args=(h.slots, 20.0, 0.8))
        t.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        ctx = _context(Path("."), headers)
        out = h.handle(rows, ctx)
        assert ctx.status == {0: 503} and time.monotonic() - t0 < 0.5
        assert int(ctx.response_headers[0]["Retry-After"]) >= 19 and "3 s" in out[0]["message"]
        t.join()
    finally:
        h.lease.close()


def test_a_worker_with_the_compiled_fast_path_compiles_at_start_up(tmp_path, monkeypatch):
    """UNIONCAM_COMPILE=1: the worker's initialize compiles the chunk forward (``unioncam.prepare``), so the
    first request finds it compiled; the answer is the library's with the same switches."""
    from unioncam.core import fast
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    monkeypatch.setenv("UNIONCAM_COMPILE", "1")
    monkeypatch.setenv("UNIONCAM_COMPILE_BACKEND", "eager")  # the plumbing, without Inductor's minutes here
    h = UnionCAMHandler()
    ctx = _context(tmp_path, [{"explain": "True"}], device="cpu", explain_wait_s=0.0)
    ctx.system_properties["gpu_id"] = None
    h.initialize(ctx)
    warmed = fast.stats(h.model)
    assert warmed and warmed["compile_s"] and not warmed["compile_failed"], warmed
    png = random_png(seed=5, side=SIZE)
    (body,) = h.handle([{"body": png}], ctx)
    assert ctx.status.get(0, 200) == 200, body
    assert fast.stats(h.model)["compile_s"] == warmed["compile_s"]  # nothing compiled on the request
    lib = unioncam.explain(h.model, _pixels(png), precision="fp32")
    assert torch.allclose(_map(body), lib.saliency, atol=1e-3)
