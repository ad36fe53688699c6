"""A/B of the masked-forward fast path: today's path and each switch of ``unioncam.core.fast``, one process.

The same images (VGG16, random weights, 224² by default) go through UnionCAM at one precision (bf16 on
CUDA) for each variant:

- ``today``: every switch off (what ``explain`` does by default);
- ``fixed``: ``fixed_chunks`` (every chunk ``batch_size`` rows, the last one padded);
- ``pool-first``: ``pool_first`` (VGG's conv → ReLU → max-pool blocks pooled before bias and ReLU);
- ``compile``: ``compile`` (``torch.compile``, Inductor; implies fixed chunks);
- ``graphs``: ``cuda_graphs`` (one captured CUDA graph per chunk shape, replayed; implies fixed chunks);
- ``all``: every switch; ``all-bs128``: every switch at 128 masked inputs per forward.

Per variant: ``unioncam.prepare`` first (its seconds, and the compile / capture seconds it reports),
``--warmup`` untimed calls, then every image timed (device-synchronised wall time): median ms/img and
p10–p90; peak memory of the timed calls (CUDA: ``max_memory_allocated`` after ``empty_cache`` and
``reset_peak_memory_stats``, with what was resident before, the weights and the half-precision weight copy
reported apart; CPU: peak RSS); the largest absolute difference of each map to today's map of the same
image and how many ``selected`` agree. Every variant runs inside ``try``/``except``: one that fails is
recorded with its error and the others still run (a GPU session can measure, not debug). The JSON is
rewritten after every variant (``"complete": false`` until the end).

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
import os
import statistics
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
#: Cheap variants first: a step cut off by its time limit keeps them (each compile takes the longest).
VARIANTS: dict[str, tuple[dict[str, bool], int | None]] = {
    "today": (OFF, None),
    "fixed": ({**OFF, "fixed_chunks": True}, None),
    "pool-first": ({**OFF, "pool_first": True}, None),
    "graphs": ({**OFF, "cuda_graphs": True}, None),
    "compile": ({**OFF, "compile": True}, None),
    "all": (ALL, None),
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
                today_maps: dict) -> dict:
    """One variant, measured; raises on failure (the caller records it)."""
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
    row["compile_s"] = sum(info.get("compile_s", {}).values())
    row["capture_s"] = sum(info.get("capture_s", {}).values())
    row["resolved"] = info["fast"]

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
    if device.type == "cuda":
        low = weights["half_copy"] if args.precision in ("bf16", "fp16") else 0
        on = info["fast"]
        # Today's scorer casts the half-precision weights per call (inside the peak); the fast path keeps
        # one copy with the model (inside what was resident before the timed calls).
        row.update(resident_gb=_gb(resident), weights_gb=_gb(weights["params"] + weights["buffers"]),
                   half_weight_copy_gb=_gb(low),
                   half_copy_held="with the model" if any(on.values()) else "per call",
                   working_set_gb=_gb(torch.cuda.max_memory_allocated(device) - resident
                                      - (0 if any(on.values()) else low)))
    stats = fastmod.stats(model)
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
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no variant starts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--forward-only", type=int, default=0, metavar="N",
                    help="time the chunk forward alone, N full chunks per timed call (--images calls), not explain")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ab-<device>-<size>.json)")
    a = ap.parse_args(argv)
    dry = a.dry_run
    if dry:
        # Dynamo traces the forward, nothing is compiled: the compile path runs, in seconds.
        os.environ.setdefault(fastmod.COMPILE_BACKEND, "eager")
    device = torch.device(a.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    size = a.size or (32 if dry else 224)
    n_images = a.images or (2 if dry else 6)
    a.warmup = a.warmup if a.warmup is not None else (1 if dry else 2)
    model_name = a.model or ("tiny-vgg" if dry else "vgg16")
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}")
    if "today" in names:
        names = ["today"] + [v for v in names if v != "today"]  # the others are compared with it
    if a.threads:
        torch.set_num_threads(a.threads)
    a.size, a.images, a.model_name = size, n_images, model_name
    a.precision = unioncam.core.resolve_precision(a.precision, device)
    model = tiny_vgg().to(device) if model_name == "tiny-vgg" else unioncam.load_vgg16("random", device=device)
    model.to(memory_format=torch.channels_last)
    images = [x.to(device) for x in _images(n_images, size, 0)]
    with torch.no_grad():
        targets = [int(model(x[None]).argmax()) for x in images]
    weights = weight_bytes(model)
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"ab-{device.type}-{size}.json"
    start = time.monotonic()
    rows: list[dict] = []

    def result(complete: bool) -> dict:
        res = {
            "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete, "dry_run": dry, "device": _device_name(device), "device_type": device.type,
            "versions": _versions(), "commit": _git_commit(),
            "unioncam_triton": os.environ.get("UNIONCAM_TRITON", "(unset: kernels where possible)"),
            "compile_backend": os.environ.get(fastmod.COMPILE_BACKEND) or "inductor",
            "settings": {"model": model_name, "size": size, "images": n_images, "warmup": a.warmup,
                         "forward_only": a.forward_only,
                         "precision": a.precision, "variants": names,
                         "default_batch_size": a.batch_size or default_batch_size(device, (size, size)),
                         "threads": torch.get_num_threads()},
            "model_bytes": weights, "rows": rows, "seconds": round(time.monotonic() - start, 1),
        }
        if device.type != "cuda":
            res["gpu"] = "not measured: no GPU was available for this run"
        return res

    today_maps: dict = {}
    if a.forward_only:
        rows.extend(forward_ab(names, model, a, device))
    for name in [] if a.forward_only else names:
        switches, bs = VARIANTS[name]
        bs = bs or a.batch_size or default_batch_size(device, (size, size))
        if a.budget is not None and time.monotonic() - start > a.budget:
            rows.append({"variant": name, "switches": switches, "batch_size": bs,
                         "skipped": f"budget of {a.budget:.0f} s spent"})
            print(f"{name}: skipped, budget spent", flush=True)
            write_json(out, result(False), quiet=True)
            continue
        print(f"{name}: {switches}, batch {bs}", flush=True)
        try:
            rows.append(run_variant(name, switches, bs, model, images, targets, a, device, weights, today_maps))
        except Exception as e:  # noqa: BLE001 - record it, measure the others
            rows.append({"variant": name, "switches": switches, "batch_size": bs,
                         "error": f"{type(e).__name__}: {str(e)[:500]}",
                         "traceback": traceback.format_exc()[-3000:]})
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            fastmod.release(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_json(out, result(False), quiet=True)
    final = result(True)
    final["table"] = ab_table(rows, device.type)
    print("\n".join(final["table"]))
    write_json(out, final)
    return final


if __name__ == "__main__":
    main()
