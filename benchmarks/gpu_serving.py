"""The TorchServe handler on CUDA without Java: a step of ``benchmarks/gpu_check.py``.

The GPU machine has neither Java nor TorchServe, so the handler runs in-process with the tests' stand-in
for TorchServe's context (``tests/fakes.py``; TorchServe's metrics calls are skipped without it), its
archive settings those ``unioncam archive --device cuda`` writes:

1. ``traps``: ``gpu_id`` None → the CPU with one log line; a CUDA out-of-memory error during one request
   (faked) → that request's 507 with a sentence, and the next request served.
2. ``load``: ``--requests`` concurrent UnionCAM requests and as many predictions, arriving at once, handed
   to one worker in TorchServe's batches (``batchSize`` of the GPU archive, arrival order, the two kinds
   interleaved): per-request latency (p50/p99, from the common arrival to its batch's answer),
   throughput, peak memory of the worker; every explanation against ``unioncam.explain`` of its own
   image on the same device (max abs difference of the float16 map on the wire, the selected map), every
   prediction against the model's own top 5. Run twice: ``shared`` (a batch's explanations in one
   ``explain_batch``, the GPU archive) and ``alone`` (one ``explain`` per request, the CPU archive's way).
3. ``handler-tests``: the in-process handler tests of ``tests/test_serving_gpu.py`` with the handler on
   this device (``UNIONCAM_TEST_GPU_ID``), in a subprocess (pytest's summary kept). Last, and limited to
   what is left of ``--budget`` (default: the step's limit that ``gpu_check.py`` passes in
   ``UNIONCAM_STEP_LIMIT_S``, less a margin): a hang there cannot cost the load's figures or the step.

Each part is wrapped: a failure is recorded with its traceback in the JSON and the others still run.

    python benchmarks/gpu_serving.py --out gpu-out/serving.json            # CUDA: VGG16 (random), 224², 32 + 32
    python benchmarks/gpu_serving.py --dry-run --out /tmp/serving.json     # CPU: shapes CNN, 32², 4 + 4
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # the summary (summary_lines) reads the JSON without torch
    import torch  # noqa: E402
except ImportError:  # pragma: no cover
    torch = None


def _png(seed: int, side: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(side // 8, side // 8, 3, generator=g) * 255).byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(img).resize((side, side), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def _context(model_dir: Path, gpu_id, handler: dict, headers: list[dict], min_workers: int = 2):
    from tests.fakes import FakeContext

    ctx = FakeContext(model_dir, headers)
    ctx.system_properties["gpu_id"] = gpu_id
    ctx.model_yaml_config = {"minWorkers": min_workers, "responseTimeout": 120, "handler": dict(handler)}
    return ctx


def _handler(model_dir: Path, gpu_id, cfg: dict):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    h.initialize(_context(model_dir, gpu_id, cfg, []))
    return h


def _map(body: dict) -> torch.Tensor:
    m = body["map"]
    return torch.frombuffer(bytearray(base64.b64decode(m["data"])), dtype=torch.float16).reshape(m["shape"]).float()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ parts


def part_traps(a, model_dir: Path, gpu_id, cfg: dict) -> dict:
    """gpu_id None → CPU with one log line; a faked CUDA OOM → 507 for that request, the next one served."""
    import unioncam.serve.service as handler_module
    from tests.fakes import random_png

    rec: dict = {}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("unioncam.serve.service")
    keep, level = Keep(), log.level
    log.addHandler(keep)
    log.setLevel(logging.INFO)
    try:
        small = {**cfg, "model": "shapes", "image_size": 32, "channels": 128, "forward_gflops": None}
        h = _handler(model_dir / "trap-none", None, small)
        notes = [r.getMessage() for r in records if "serving on the CPU" in r.getMessage()]
        rec["gpu_id_none"] = {"device": str(h.device), "log_lines": notes,
                              "ok": h.device.type == "cpu" and len(notes) == 1}
        h.lease.close()
    finally:
        log.removeHandler(keep)
        log.setLevel(level)

    h = _handler(model_dir / "trap-oom", gpu_id, {**cfg, "model": "shapes", "image_size": 32, "channels": 128,
                                                  "forward_gflops": None})
    real, calls = handler_module.explain, []

    def oom_once(*args, **kw):
        if not calls:
            calls.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (faked)")
        return real(*args, **kw)

    handler_module.explain = oom_once
    try:
        ctx = _context(model_dir, gpu_id, cfg, [{"explain": "True"}, {}])
        out = h.handle([{"image": random_png(1)}, {"body": random_png(1)}], ctx)
        message = out[0].get("message") if isinstance(out[0], dict) else None
        first = {"status": ctx.status.get(0, 200), "message": message,
                 "retry_after": ctx.response_headers.get(0, {}).get("Retry-After"),
                 "neighbour_status": ctx.status.get(1, 200)}
        ctx = _context(model_dir, gpu_id, cfg, [{"explain": "True"}])
        out = h.handle([{"image": random_png(2)}], ctx)
        rec["oom"] = {"first": first, "next_status": ctx.status.get(0, 200), "device": str(h.device),
                      "ok": first["status"] == 507 and first["neighbour_status"] == 200
                      and ctx.status.get(0, 200) == 200 and out[0].get("method") == "unioncam"}
    finally:
        handler_module.explain = real
        h.lease.close()
    rec["ok"] = rec["gpu_id_none"]["ok"] and rec["oom"]["ok"]
    return rec


#: Seconds kept free at the end of the budget (the JSON, the interpreter's exit).
MARGIN_S = 5.0
#: The handler tests are not started with less than this many seconds left.
MIN_TESTS_S = 10.0


def tests_timeout(requested: float, budget: float | None, elapsed: float) -> float:
    """The handler tests' limit: ``requested``, cut to what is left of ``budget`` after ``elapsed`` seconds."""
    if budget is None:
        return requested
    return max(0.0, min(requested, budget - elapsed - MARGIN_S))


def part_handler_tests(a, gpu_id, timeout: float) -> dict:
    """The in-process handler tests of tests/test_serving_gpu.py on this device, in a subprocess."""
    env = dict(os.environ)
    if gpu_id is not None:
        env["UNIONCAM_TEST_GPU_ID"] = str(gpu_id)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "--tb=short", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_serving_gpu.py"), "-k",
           "explain_batch or out_of_memory or falls_back or gpu_id"]
    rec: dict = {"command": " ".join(cmd[3:]), "timeout_s": round(timeout, 1)}
    if timeout < MIN_TESTS_S:
        return {**rec, "ok": False, "error": f"skipped: {timeout:.0f} s left of the step's budget"}
    t0 = time.monotonic()
    # In this step's process group: gpu_check.py ending the step ends it too.
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        text, _ = p.communicate()
        rc = None
    lines = (text or "").strip().splitlines()
    rec.update(exit=rc, seconds=round(time.monotonic() - t0, 1), tail=lines[-25:], ok=rc == 0,
               summary=lines[-1] if lines and rc is not None else f"timeout after {timeout:.0f} s")
    if rc is None:
        rec["error"] = f"timeout after {timeout:.0f} s"
    return rec


def _load_once(h, device: torch.device, rows: list[tuple[str, bytes]], batch: int) -> dict:
    """Every row arrives at t0; batches of ``batch`` in arrival order, one worker: latency to its batch's end."""
    from tests.fakes import FakeContext

    answers: list = [None] * len(rows)
    latency: list[float] = [0.0] * len(rows)
    statuses: list[int] = [200] * len(rows)
    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        ctx = FakeContext(Path("."), [{"explain": "True"} if kind == "explain" else {} for kind, _ in part])
        data = [{"image": png} if kind == "explain" else {"body": png} for kind, png in part]
        out = h.handle(data, ctx)
        _sync(device)
        done = time.perf_counter() - t0
        for i, ans in enumerate(out):
            answers[start + i] = ans
            latency[start + i] = done
            statuses[start + i] = ctx.status.get(i, 200)
    total = time.perf_counter() - t0
    return {"answers": answers, "latency": latency, "statuses": statuses, "total_s": total}


def part_load(a, model_dir: Path, gpu_id, cfg: dict, device: torch.device) -> dict:
    import unioncam

    rec: dict = {"requests": a.requests, "predictions": a.requests, "batch": a.batch, "image_size": a.size,
                 "model": a.model, "workers": 1}
    side = a.size + a.size // 4  # uploads a little larger than the archive's size: the resize runs too
    pngs = [_png(100 + i, side) for i in range(a.requests)]
    rows: list[tuple[str, bytes]] = []
    for i in range(a.requests):  # interleaved arrivals: E, P, E, P, ...
        rows += [("explain", pngs[i]), ("predict", pngs[(i + 1) % a.requests])]
    modes = {}
    for mode, gpu_settings in (("shared", True), ("alone", False)):
        try:
            h = _handler(model_dir / mode, gpu_id, {**cfg, "device": "cuda" if gpu_settings else "cpu"})
            rec.setdefault("device", str(h.device))
            rec.setdefault("precision", h.precision)
            rec.setdefault("masked_batch_size", h.batch_size)
            warm = _load_once(h, device, rows[:a.batch], a.batch)  # cuDNN autotuning, kernel compiles
            del warm
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device) / 1e9
            res = _load_once(h, device, rows, a.batch)
            m: dict = {"total_s": round(res["total_s"], 4)}
            if device.type == "cuda":
                m["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
                m["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 3)
                m["resident_gb"] = round(resident, 3)
            for kind in ("explain", "predict"):
                lat = [res["latency"][i] for i, (k, _) in enumerate(rows) if k == kind]
                m[kind] = {"p50_s": round(statistics.median(lat), 4), "p99_s": round(_pct(lat, 0.99), 4),
                           "statuses": sorted({res["statuses"][i] for i, (k, _) in enumerate(rows) if k == kind})}
            m["requests_per_s"] = round(len(rows) / res["total_s"], 2)
            m["explanations_per_s"] = round(a.requests / res["total_s"], 2)
            m["ms_per_explanation"] = round(res["total_s"] / a.requests * 1000, 2)
            # Every answer against the library on its own image, on this device.
            diffs, selected, top5 = [], 0, 0
            for i, (kind, png) in enumerate(rows):
                ans = res["answers"][i]
                px = unioncam.to_pixels(unioncam.decode_image(png), size=a.size)
                if kind == "explain":
                    ref = unioncam.explain(h.model, px, precision=h.precision, batch_size=h.batch_size)
                    diffs.append(float((_map(ans) - ref.saliency).abs().max()))
                    selected += ans["details"].get("selected") == ref.details.get("selected")
                    m.setdefault("shared_with", ans["timings"].get("shared_with", 1))
                else:
                    with torch.no_grad():
                        probs = h.model(px[None].to(h.device)).float().softmax(-1)[0]
                    top5 += [p["class"] for p in ans["predictions"]] == probs.topk(5).indices.tolist()
            m["map_max_abs_diff"] = max(diffs) if diffs else None
            m["map_mean_max_abs_diff"] = statistics.mean(diffs) if diffs else None
            m["selected_agree"] = f"{selected}/{a.requests}"
            m["top5_agree"] = f"{top5}/{a.requests}"
            tol = a.tolerance
            m["ok"] = (m["explain"]["statuses"] == [200] and m["predict"]["statuses"] == [200]
                       and m["map_max_abs_diff"] is not None and m["map_max_abs_diff"] <= tol
                       and selected == a.requests and top5 == a.requests)
            m["tolerance"] = tol
            h.lease.close()
            del h
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 — recorded; the other mode still runs
            m = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        modes[mode] = m
    rec["modes"] = modes
    rec["ok"] = all(m.get("ok") for m in modes.values())
    return rec


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="serving.json", help="the JSON written (after every part)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, small: shapes CNN at 32², 4 + 4 requests")
    ap.add_argument("--model", default=None, help="default vgg16 (random weights); dry run shapes")
    ap.add_argument("--size", type=int, default=None, help="image size; default 224, dry run 32")
    ap.add_argument("--requests", type=int, default=None, help="UnionCAM requests (and as many predictions); "
                    "default 32, dry run 4")
    ap.add_argument("--batch", type=int, default=None,
                    help="requests per handler call (TorchServe's batchSize); default the GPU archive's (8), "
                    "dry run 4")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max abs difference of a map from the library's (float16 on the wire; bf16 chunks); "
                    "default 1e-2, dry run (strict fp32) 2e-3")
    ap.add_argument("--tests-timeout", type=float, default=60.0,
                    help="seconds for the handler tests (cut to what is left of --budget)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole script (default: $UNIONCAM_STEP_LIMIT_S less a margin, else none)")
    ap.add_argument("--only", default=None, help="comma list of parts: traps, handler-tests, load")
    a = ap.parse_args(argv)
    started = time.monotonic()
    step_limit = os.environ.get("UNIONCAM_STEP_LIMIT_S")  # gpu_check.py: this step's limit
    if a.budget is None and step_limit:
        a.budget = max(0.0, float(step_limit) - MARGIN_S)
    from unioncam.serve.archive import ArchiveSettings

    cuda = torch.cuda.is_available() and not a.dry_run
    a.model = a.model or ("shapes" if a.dry_run else "vgg16")
    a.size = a.size or (32 if a.dry_run else 224)
    a.requests = a.requests or (4 if a.dry_run else 32)
    precision = "auto" if cuda else "fp32"
    a.tolerance = a.tolerance if a.tolerance is not None else (1e-2 if cuda else 2e-3)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec: dict = {"dry_run": a.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "cuda_available": torch.cuda.is_available(), "budget_s": a.budget, "parts": {}}
    if cuda:
        rec["device_name"] = torch.cuda.get_device_name(0)
    else:
        rec["device_name"] = platform.processor() or platform.machine()

    def save() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        os.replace(tmp, out)

    try:
        settings = ArchiveSettings(model=a.model, weights="random", image_size=a.size, device="cuda", gpus=1,
                                   precision=precision)
        a.batch = a.batch or (4 if a.dry_run else settings.max_batch_size)
        cost = settings.cost
        cfg = {"model": a.model, "weights": "random", "seed": 0, "image_size": a.size, "method": "unioncam",
               "theta": 10.0, "layer": None, "batch_size": None, "precision": precision, "device": "cuda",
               "explain_slots": None, "explain_wait_s": settings.explain_wait, "channels": cost.channels,
               "forward_gflops": round(cost.gflops, 3)}
        rec["archive"] = {"batchSize": a.batch, "maxBatchDelay": settings.max_batch_delay_ms,
                          "explain_wait_s": settings.explain_wait, "responseTimeout": settings.timeout,
                          "workers_per_gpu": settings.workers_per_gpu, "precision": precision}
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"settings: {type(e).__name__}: {e}"
        rec["ok"] = False
        save()
        return 1
    gpu_id = 0 if cuda else None
    device = torch.device("cuda:0" if cuda else "cpu")
    import tempfile

    model_dir = Path(tempfile.mkdtemp(prefix="unioncam-gpu-serving-"))
    only = {s.strip() for s in a.only.split(",")} if a.only else None
    # The load's figures before the handler tests: the tests run in a subprocess limited to what is left.
    parts = [("traps", lambda: part_traps(a, model_dir, gpu_id, cfg)),
             ("load", lambda: part_load(a, model_dir, gpu_id, cfg, device)),
             ("handler-tests", lambda: part_handler_tests(
                 a, gpu_id, tests_timeout(a.tests_timeout, a.budget, time.monotonic() - started)))]
    for name, fn in parts:
        if only is not None and name not in only:
            continue
        t0 = time.monotonic()
        print(f"--- {name}", flush=True)
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 — a GPU session cannot debug: record and go on
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        res["seconds"] = round(time.monotonic() - t0, 1)
        rec["parts"][name] = res
        print(json.dumps({k: v for k, v in res.items() if k not in ("tail", "traceback")}, default=str)[:2000],
              flush=True)
        if "traceback" in res:
            print(res["traceback"], flush=True)
        save()
    rec["ok"] = all(p.get("ok") for p in rec["parts"].values())
    save()
    print(f"serving: {'ok' if rec['ok'] else 'FAILED'}; {out}", flush=True)
    return 0 if rec["ok"] else 1


def summary_lines(out: Path) -> list[str]:
    """The summary's section for ``out/serving.json`` (``benchmarks/gpu_summary.py`` calls this)."""
    L = ["", "## The handler on this device (in-process, as TorchServe would batch)", ""]
    try:
        rec = json.loads((Path(out) / "serving.json").read_text())
    except (OSError, ValueError):
        return L + ["not measured (no serving.json; see `serving.log`)"]
    parts = rec.get("parts", {})
    load = parts.get("load", {})
    arch = rec.get("archive", {})
    L.append(f"{load.get('requests', '—')} UnionCAM + {load.get('predictions', '—')} prediction requests at once, "
             f"{load.get('model', '—')} (random weights) at {load.get('image_size', '—')}², one worker on "
             f"{load.get('device', '—')}, batches of {arch.get('batchSize', '—')}, precision "
             f"{load.get('precision', '—')}, masked inputs per forward {load.get('masked_batch_size') or 'default'}. "
             "Latency: from the common arrival to the answer of the request's batch.")
    L += ["", "| mode | UnionCAM p50 / p99 s | prediction p50 / p99 s | ms per UnionCAM | requests/s | peak allocated GB "
          "| map max abs diff vs explain | selected / top-5 agree |", "|---|---|---|---|---|---|---|---|"]
    for mode, m in load.get("modes", {}).items():
        if "error" in m:
            L.append(f"| {mode} | failed: {m['error'][:150]} | | | | | | |")
            continue
        e, p = m["explain"], m["predict"]
        diff = m.get("map_max_abs_diff")
        L.append(f"| {mode} | {e['p50_s']} / {e['p99_s']} | {p['p50_s']} / {p['p99_s']} | {m['ms_per_explanation']} | "
                 f"{m['requests_per_s']} | {m.get('peak_allocated_gb', '—')} | "
                 f"{'—' if diff is None else f'{diff:.2e}'} (≤ {m.get('tolerance')}) | "
                 f"{m['selected_agree']} / {m['top5_agree']} |")
    traps = parts.get("traps", {})
    if traps:
        oom = traps.get("oom", {}).get("first", {})
        L += ["", f"- traps: gpu_id None → {traps.get('gpu_id_none', {}).get('device', '—')} "
              f"({len(traps.get('gpu_id_none', {}).get('log_lines', []))} log line); faked CUDA OOM → "
              f"{oom.get('status', '—')}, its batch-mate {oom.get('neighbour_status', '—')}, the next request "
              f"{traps.get('oom', {}).get('next_status', '—')}" + ("" if traps.get("ok") else
                                                                   f" — FAILED {traps.get('error', '')}")]
    ht = parts.get("handler-tests", {})
    if ht:
        L.append(f"- handler tests on this device: {ht.get('summary') or ht.get('error', '—')}")
    for name, part in parts.items():
        if part.get("error"):
            L.append(f"- {name} FAILED: {part['error'][:300]}")
    return L


if __name__ == "__main__":
    sys.exit(main())
