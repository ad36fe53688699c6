"""A/B of the masked-forward fast path: today's path and each switch of ``unioncam.core.fast``, a process each.

The same images (VGG16, random weights, 224² by default) go through UnionCAM at one precision (bf16 on
CUDA) for each variant, in this order (the deciding rows first, so a cut-off step keeps them):

- ``today``: every switch off (what ``explain`` does by default);
- ``graphs``: ``cuda_graphs`` (one captured CUDA graph per chunk shape, replayed; implies fixed chunks);
- ``all``: every switch;
- ``compile``: ``compile`` (``torch.compile``, Inductor; implies fixed chunks);
- ``fixed``: ``fixed_chunks`` (every chunk ``batch_size`` rows, the last one padded);
- ``pool-first``: ``pool_first`` (VGG's conv → ReLU → max-pool blocks pooled before bias and ReLU);
- ``all-bs128``: every switch at 128 masked inputs per forward.

Each variant runs in a process of its own (this script again, ``--variant``) with its own time limit
(``LIMIT_S``, cut to what is left of ``--budget``), its own session and fresh ``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR`` (every compile a cold start, as a new server's; ``all`` does not reuse ``compile``'s
kernels). A variant that crashes (a CUDA error, an abort), fails or runs out of time becomes a row with its
cause and its log's tail, and with what it measured before (``prepare``'s seconds); the next variant starts
in a clean process, so a failed CUDA-graph capture cannot poison the rows after it. ``today``'s maps go to
a scratch file, and every later variant compares its maps with them.

Per variant: ``unioncam.prepare`` first (its seconds, and the compile and capture seconds the engine times
apart), ``--warmup`` untimed calls, then every image timed (device-synchronised wall time): median ms/img
and p10–p90; peak memory of the timed calls (CUDA: ``max_memory_allocated`` after ``empty_cache`` and
``reset_peak_memory_stats``, with what was resident before, the weights and the half-precision weight copy
reported apart, and the CUDA graphs' private pool, ``graph_pool_gb``, added to the peak and the working
set: a pool stays reserved, not allocated, between replays; CPU: peak RSS); the largest absolute difference
of each map to today's map of the same image and how many ``selected`` agree. The JSON is rewritten when a
variant starts (its row says ``running``) and when it ends (``"complete": false`` until the end), so a cut
keeps every row so far (a GPU session can measure, not debug).

    python benchmarks/gpu_ab.py --out gpu-out/ab.json                 # CUDA: VGG16 224², 6 images
    python benchmarks/gpu_ab.py --dry-run --out /tmp/ab.json          # CPU, a tiny VGG at 32², seconds

``--dry-run``: CPU, a small random torchvision VGG at 32², 2 images; CUDA graphs are skipped (there is no
GPU: the row says so) and ``torch.compile`` uses the ``eager`` backend (dynamo traces, nothing is compiled),
so the step's code runs in CI in seconds. On a CPU without ``--dry-run`` graphs are skipped likewise and
compile is Inductor's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import unioncam  # noqa: E402
from bench_latency import (  # noqa: E402
    _device_name,
    _git_commit,
    _images,
    _peak,
    _reset_peak,
    _sync,
    _versions,
    weight_bytes,
    write_json,
)
from gpu_summary import ab_table  # noqa: E402
from unioncam.core import fast as fastmod  # noqa: E402
from unioncam.core.scorer import default_batch_size  # noqa: E402

OFF = {"fixed_chunks": False, "pool_first": False, "compile": False, "cuda_graphs": False}
ALL = {k: True for k in OFF}
#: name → (switches, batch size: None = the engine's default for the device and size).
#: The deciding rows first (today's path, then graphs and all of the switches, the likeliest new defaults):
#: a step cut off by its time limit keeps them; the rows that refine the choice come after.
VARIANTS: dict[str, tuple[dict[str, bool], int | None]] = {
    "today": (OFF, None),
    "graphs": ({**OFF, "cuda_graphs": True}, None),
    "all": (ALL, None),
    "compile": ({**OFF, "compile": True}, None),
    "fixed": ({**OFF, "fixed_chunks": True}, None),
    "pool-first": ({**OFF, "pool_first": True}, None),
    "all-bs128": (ALL, 128),
}


def tiny_vgg() -> torch.nn.Module:
    """A small random torchvision VGG (pixel input) for the dry run: same block structure as VGG16."""
    from torchvision.models.vgg import VGG, make_layers

    from unioncam.models import pixel_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = VGG(make_layers([16, "M", 32, "M", 32, 32, "M"]), num_classes=10)
        m.classifier = torch.nn.Sequential(torch.nn.Linear(32 * 49, 64), torch.nn.ReLU(True), torch.nn.Dropout(),
                                           torch.nn.Linear(64, 10))
    m.eval().requires_grad_(False)
    return pixel_model(m, default_layer=f"features.{len(m.features) - 2}")  # the last ReLU


def _gb(b: float) -> float:
    return b / 2**30


def forward_ab(names: list[str], model, args, device) -> list[dict]:
    """``--forward-only``: each variant's chunk forward alone, ``args.forward_only`` full chunks per timed call
    (random normalised inputs, as the region map feeds it), ms per chunk. Every variant is prepared first
    (compile / capture), then the variants take turns call by call, so that a shared machine's load hits
    them alike; peak memory is therefore not per variant here."""
    from unioncam.core import Scorer

    runs: list[tuple[dict, Any, Callable]] = []
    rows: list[dict] = []
    today: dict = {}
    for name in names:
        switches, bs = VARIANTS[name]
        bs = bs or args.batch_size or default_batch_size(device, (args.size, args.size))
        row: dict = {"variant": name, "switches": switches, "batch_size": bs, "unit": "chunk", "seconds": []}
        rows.append(row)
        try:
            t0 = time.perf_counter()
            before = fastmod.stats(model).get("compile_s", {})
            info = unioncam.prepare(model, args.size, precision=args.precision, batch_size=bs, fast=switches)
            row["prepare_s"] = time.perf_counter() - t0
            row["compile_s"] = sum(v for k, v in info.get("compile_s", {}).items() if k not in before)
            row["capture_s"] = sum(info.get("capture_s", {}).values())
            row["resolved"] = info["fast"]
            scorer = Scorer(model, bs, precision=args.precision, fast=switches)
            n = bs * args.forward_only
            g = torch.Generator().manual_seed(1)
            z = torch.randn(n, 3, args.size, args.size, generator=g).to(device, scorer.mask_dtype)
            z = z.contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, 10 if args.model_name == "tiny-vgg" else 1000, (n,), generator=g).to(device)
            normalized = scorer.normalize is not None

            def call(scorer=scorer, z=z, t=t, n=n, normalized=normalized):
                return scorer(n, lambda i, j: z[i:j], t, normalized=normalized)

            for _ in range(args.warmup):
                call()
            runs.append((row, call, lambda r=row: r))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            row["traceback"] = traceback.format_exc()[-3000:]
    for _ in range(args.images):
        for row, call, _ in runs:
            if "error" in row:
                continue
            try:
                _sync(device)
                t1 = time.perf_counter()
                scores = call()
                _sync(device)
                row["seconds"].append((time.perf_counter() - t1) / args.forward_only)
                if row["variant"] == "today":
                    today["s"] = scores
                elif "s" in today:
                    row["max_abs_score_diff"] = max(row.get("max_abs_score_diff", 0.0),
                                                    float((scores - today["s"]).abs().max()))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                row["traceback"] = traceback.format_exc()[-3000:]
    for row in rows:
        sec = row["seconds"]
        if sec:
            q = statistics.quantiles(sec, n=10, method="inclusive") if len(sec) > 1 else [sec[0]] * 9
            row.update(median_s=statistics.median(sec), p10_s=q[0], p90_s=q[-1], images=len(sec))
    st = fastmod.stats(model)
    for row in rows:
        row["compile_failed"], row["graphs_failed"] = st.get("compile_failed"), st.get("graphs_failed")
    row_peak = _peak(device)
    for row in rows:
        row.update(row_peak)
    return rows


def run_variant(name: str, switches: dict, bs: int, model, images, targets, args, device, weights,
                today_maps: dict, progress: Callable[[dict], None] | None = None) -> dict:
    """One variant, measured; raises on failure (the parent records it). ``progress(row)`` after ``prepare``:
    a variant that dies later keeps its prepare, compile and capture seconds."""
    row: dict = {"variant": name, "switches": switches, "batch_size": bs}
    if device.type != "cuda" and switches.get("cuda_graphs"):
        row["note"] = "CUDA graphs skipped: no GPU (the scorer drops the switch off CUDA)"
    fastmod.release(model)  # a variant starts with nothing compiled or captured
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    info = unioncam.prepare(model, args.size, precision=args.precision, batch_size=bs, fast=switches)
    row["prepare_s"] = time.perf_counter() - t0
    # Timed apart by the engine: compile (torch.compile's first call) and capture (warm-up, capture, check).
    row["compile_s"] = sum(info.get("compile_s", {}).values())
    row["capture_s"] = sum(info.get("capture_s", {}).values())
    row["resolved"] = info["fast"]
    if progress is not None:
        progress(row)
    _inject(args, name, "after-prepare")

    def call(k: int):
        return unioncam.explain(model, images[k], target=targets[k], precision=args.precision, batch_size=bs,
                                fast=switches)

    for i in range(args.warmup):
        call(i % len(images))
    _sync(device)
    row["peak_memory_kind"] = _reset_peak(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    seconds, maps, selected = [], {}, {}
    for k in range(len(images)):
        _sync(device)
        t = time.perf_counter()
        res = call(k)
        _sync(device)
        seconds.append(time.perf_counter() - t)
        maps[k] = res.saliency
        selected[k] = res.details["selected"]
    q = statistics.quantiles(seconds, n=10, method="inclusive") if len(seconds) > 1 else [seconds[0]] * 9
    row.update(median_s=statistics.median(seconds), p10_s=q[0], p90_s=q[-1], seconds=seconds, images=len(seconds))
    row.update(_peak(device))
    stats = fastmod.stats(model)
    # A CUDA graph's private pool stays reserved, not allocated, between replays: max_memory_allocated
    # misses it. The engine measured it (reserved memory's growth across each capture).
    pool = float(stats.get("graph_pool_gb", 0.0) or 0.0)
    row["graph_pool_gb"] = pool
    if device.type == "cuda":
        low = weights["half_copy"] if args.precision in ("bf16", "fp16") else 0
        on = info["fast"]
        # Today's scorer casts the half-precision weights per call (inside the peak); the fast path keeps
        # one copy with the model (inside what was resident before the timed calls).
        row.update(resident_gb=_gb(resident), weights_gb=_gb(weights["params"] + weights["buffers"]),
                   half_weight_copy_gb=_gb(low),
                   half_copy_held="with the model" if any(on.values()) else "per call",
                   working_set_gb=_gb(torch.cuda.max_memory_allocated(device) - resident
                                      - (0 if any(on.values()) else low)) + pool,
                   peak_gb=_gb(torch.cuda.max_memory_allocated(device)) + pool)
    row["compile_failed"], row["graphs_failed"] = stats.get("compile_failed"), stats.get("graphs_failed")
    row["graphs"] = stats.get("graphs", 0)
    if name == "today":
        today_maps.update({k: (maps[k], selected[k]) for k in maps})
    elif today_maps:
        diffs = [float((maps[k] - today_maps[k][0]).abs().max()) for k in maps if k in today_maps]
        row["max_abs_map_diff"] = max(diffs) if diffs else None
        same = sum(selected[k] == today_maps[k][1] for k in maps if k in today_maps)
        row["selected_agree"] = f"{same}/{len(diffs)}"
    fastmod.release(model)
    return row


def _inject(args, name: str, where: str) -> None:
    """``--inject-failure VARIANT:KIND`` (tests): this variant's process raises, aborts (as a CUDA assert
    would) or hangs after ``prepare``, so that the parent's handling of each can be checked on a CPU."""
    for item in (args.inject_failure or "").split(","):
        variant, _, kind = item.partition(":")
        if variant.strip() != name or where != "after-prepare":
            continue
        kind = kind.strip() or "raise"
        print(f"{name}: injected failure: {kind}", flush=True)
        if kind == "abort":
            os.abort()
        if kind == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected failure in variant {name}")


#: Seconds each variant's process may take (GPU; the dry run allows DRY_LIMIT_S each): start-up, model,
#: prepare (a cold Inductor compile for the compiled ones), warm-up and the timed images.
LIMIT_S = {"today": 40, "graphs": 45, "all": 80, "compile": 80, "fixed": 35, "pool-first": 35, "all-bs128": 80}
DRY_LIMIT_S = 90
#: A variant is not started with less than this many seconds of the budget left.
MIN_VARIANT_S = 15


def _settings(a, device, model_name: str, size: int, n_images: int, names: list[str]) -> dict:
    return {"model": model_name, "size": size, "images": n_images, "warmup": a.warmup,
            "forward_only": a.forward_only, "precision": a.precision, "variants": names,
            "default_batch_size": a.batch_size or default_batch_size(device, (size, size)),
            "threads": a.threads or torch.get_num_threads()}


def child(a, device, model_name: str, size: int, n_images: int) -> int:
    """``--variant``: one variant in this process; its row (and what it knows of the run) into ``--row-out``,
    written once after ``prepare`` and again at the end."""
    name = a.variant
    out = Path(a.row_out)
    # The compile caches this process was given, and whether they were empty at its start (cold).
    caches = {var: os.environ.get(var) for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    cold = all(d and (not Path(d).exists() or not any(Path(d).iterdir())) for d in caches.values())
    switches, bs = VARIANTS[name]
    bs = bs or a.batch_size or default_batch_size(device, (size, size))
    a.precision = unioncam.core.resolve_precision(a.precision, device)
    model = tiny_vgg().to(device) if model_name == "tiny-vgg" else unioncam.load_vgg16("random", device=device)
    model.to(memory_format=torch.channels_last)
    images = [x.to(device) for x in _images(n_images, size, 0)]
    with torch.no_grad():
        targets = [int(model(x[None]).argmax()) for x in images]
    weights = weight_bytes(model)
    meta = {"device": _device_name(device), "device_type": device.type, "versions": _versions(),
            "precision": a.precision, "model_bytes": weights}
    today_maps: dict = {}
    if name != "today" and a.today and Path(a.today).is_file():
        today_maps = torch.load(a.today, weights_only=False)

    def save(row: dict) -> None:
        write_json(out, {"meta": meta, "row": row}, quiet=True)

    first = {"variant": name, "switches": switches, "batch_size": bs, "caches": caches, "caches_cold": cold}
    save(first)

    def progress(row: dict) -> None:
        save({**row, "caches": caches, "caches_cold": cold})

    row = run_variant(name, switches, bs, model, images, targets, a, device, weights, today_maps, progress=progress)
    row.update(caches=caches, caches_cold=cold)
    save(row)
    if name == "today" and a.today:
        torch.save(today_maps, a.today)
    print(f"{name}: {row['median_s'] * 1e3:.1f} ms/img", flush=True)
    return 0


class _Children:
    """The variant process under way, ended with its group when this process is told to stop."""

    proc: subprocess.Popen | None = None

    @classmethod
    def stop(cls, signum, frame) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            try:
                os.killpg(cls.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise SystemExit(128 + signum)


def run_child(name: str, argv: list[str], limit: float, scratch: Path) -> tuple[dict, dict | None]:
    """Runs one variant's process (its own caches, its own session) under ``limit`` seconds; returns its
    row (an error row when it crashed or ran out of time: what it had written, the cause, its log's tail)
    and what it knew of the run."""
    log = scratch / f"{name}.log"
    row_file = scratch / f"{name}.json"
    env = dict(os.environ)
    # Cold caches, as a new server sees them: the compile of "all" must not reuse the one of "compile".
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        d = scratch / name / sub
        d.mkdir(parents=True, exist_ok=True)
        env[var] = str(d)
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        _Children.proc = proc
        try:
            rc = proc.wait(timeout=limit)
            status = None if rc == 0 else (f"crashed (signal {-rc})" if rc < 0 else f"failed (exit {rc})")
        except subprocess.TimeoutExpired:
            status = f"timeout after {limit:.0f} s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        finally:
            _Children.proc = None
    seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    print("\n".join(f"  [{name}] {ln}" for ln in text.splitlines()[-60:]), flush=True)
    got = _read_json(row_file)
    row = got.get("row") or {"variant": name}
    row["process_s"] = round(seconds, 1)
    row["limit_s"] = round(limit)
    if status is not None or "median_s" not in row:
        tail = [ln for ln in text.splitlines() if ln.strip()][-12:]
        last = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        row["error"] = f"{status or 'no row written'}: {last.strip()[:400]}"
        row["log_tail"] = tail
    return row, got.get("meta")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny VGG at 32², 2 images, graphs skipped")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available; dry run: cpu)")
    ap.add_argument("--model", default=None, help="vgg16 (default) or tiny-vgg (the dry run's)")
    ap.add_argument("--size", type=int, default=None, help="square side (default 224; dry run 32)")
    ap.add_argument("--images", type=int, default=None, help="timed images per variant (default 6; dry run 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default 2; dry run 1)")
    ap.add_argument("--precision", default="auto", help="one precision for every variant (default auto: bf16 on "
                    "CUDA and on CPUs with native bf16)")
    ap.add_argument("--batch-size", type=int, default=None, help="chunk of the variants without their own "
                    "(default: the engine's for the device and size)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {','.join(VARIANTS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all variants: none starts after, none runs past it")
    ap.add_argument("--variant-limit", type=float, default=None,
                    help="seconds each variant's process may take (default: per variant, see LIMIT_S)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--forward-only", type=int, default=0, metavar="N",
                    help="time the chunk forward alone, N full chunks per timed call (--images calls), not explain; "
                    "the variants take turns in one process")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ab-<device>-<size>.json)")
    # One variant in this process (the parent runs each variant so).
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--today", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    step_limit = os.environ.get("UNIONCAM_STEP_LIMIT_S")  # set by gpu_check.py: the step's own limit
    if step_limit and not a.variant:
        # A little under it: the final table is written after the last variant.
        cap = max(0.0, float(step_limit) - 8)
        a.budget = cap if a.budget is None else min(a.budget, cap)
    dry = a.dry_run
    if dry:
        # Dynamo traces the forward, nothing is compiled: the compile path runs, in seconds.
        os.environ.setdefault(fastmod.COMPILE_BACKEND, "eager")
    # The parent does not touch the GPU (no CUDA context of its own): its variants' processes do.
    device = torch.device(a.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    size = a.size or (32 if dry else 224)
    n_images = a.images or (2 if dry else 6)
    a.warmup = a.warmup if a.warmup is not None else (1 if dry else 2)
    model_name = a.model or ("tiny-vgg" if dry else "vgg16")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.size, a.images, a.model_name = size, n_images, model_name
    if a.variant:
        sys.exit(child(a, device, model_name, size, n_images))
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}")
    if "today" in names:
        names = ["today"] + [v for v in names if v != "today"]  # the others are compared with it
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"ab-{device.type}-{size}.json"
    start = time.monotonic()
    rows: list[dict] = []
    meta: dict = {}

    def result(complete: bool) -> dict:
        settings = _settings(a, device, model_name, size, n_images, names)
        settings["precision"] = meta.get("precision", a.precision)
        res = {
            "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete, "dry_run": dry, "device": meta.get("device") or device.type,
            "device_type": device.type, "versions": meta.get("versions") or {}, "commit": _git_commit(),
            "unioncam_triton": os.environ.get("UNIONCAM_TRITON", "(unset: kernels where possible)"),
            "compile_backend": os.environ.get(fastmod.COMPILE_BACKEND) or "inductor",
            "processes": "forward-only: one process, variants taking turns" if a.forward_only else
            "one process per variant, each with fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR",
            "settings": settings, "model_bytes": meta.get("model_bytes", {}), "rows": rows,
            "seconds": round(time.monotonic() - start, 1),
        }
        if device.type != "cuda":
            res["gpu"] = "not measured: no GPU was available for this run"
        return res

    if a.forward_only:
        a.precision = unioncam.core.resolve_precision(a.precision, device)
        model = tiny_vgg().to(device) if model_name == "tiny-vgg" else unioncam.load_vgg16("random", device=device)
        model.to(memory_format=torch.channels_last)
        meta.update(device=_device_name(device), versions=_versions(), model_bytes=weight_bytes(model))
        rows.extend(forward_ab(names, model, a, device))
    else:
        _variants(a, names, rows, meta, out, result, start)
    final = result(True)
    final["table"] = ab_table(rows, device.type)
    print("\n".join(final["table"]))
    write_json(out, final)
    return final


def _variants(a, names: list[str], rows: list[dict], meta: dict, out: Path, result, start: float) -> None:
    """Each variant in a process of its own, in order; its row written into ``out`` as soon as it ends."""
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="unioncam-ab-"))
    today = scratch / "today-maps.pt"
    forward = ["--size", str(a.size), "--images", str(a.images), "--warmup", str(a.warmup), "--model", a.model_name,
               "--precision", a.precision]
    for flag, v in (("--device", a.device), ("--batch-size", a.batch_size), ("--threads", a.threads),
                    ("--inject-failure", a.inject_failure)):
        if v is not None:
            forward += [flag, str(v)]
    if a.dry_run:
        forward.append("--dry-run")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _Children.stop)
    try:
        for name in names:
            switches, bs = VARIANTS[name]
            left = (a.budget - (time.monotonic() - start)) if a.budget is not None else float("inf")
            limit = min(a.variant_limit or (DRY_LIMIT_S if a.dry_run else LIMIT_S[name]), left)
            if limit < MIN_VARIANT_S:
                rows.append({"variant": name, "switches": switches, "batch_size": bs,
                             "skipped": f"budget of {a.budget:.0f} s spent ({max(0.0, left):.0f} s left)"})
                print(f"{name}: skipped, budget spent", flush=True)
                write_json(out, result(False), quiet=True)
                continue
            print(f"{name}: {switches}, batch {bs or a.batch_size or 'default'}, limit {limit:.0f} s", flush=True)
            # Written before it starts: a step cut off now still says which variant it was in.
            rows.append({"variant": name, "switches": switches, "batch_size": bs,
                         "running": f"started at {time.monotonic() - start:.0f} s, limit {limit:.0f} s"})
            write_json(out, result(False), quiet=True)
            argv = [sys.executable, str(Path(__file__).resolve()), *forward, "--variant", name,
                    "--row-out", str(scratch / f"{name}.json"), "--today", str(today)]
            row, got = run_child(name, argv, limit, scratch)
            row.setdefault("switches", switches)  # a process that died before writing anything
            row.setdefault("batch_size", bs or a.batch_size)
            if got and not meta:
                meta.update(got)
            rows[-1] = row
            if "error" in row:
                print(f"{name}: FAILED {row['error']}", flush=True)
            write_json(out, result(False), quiet=True)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
