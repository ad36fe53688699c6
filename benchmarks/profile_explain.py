"""Where the time of one explanation goes: a ``torch.profiler`` summary of one warmed-up call.

CUDA: every device event (kernels, copies, memsets) of one ``explain`` call, grouped by name; the top
ones by GPU time; and the share of the call's wall time that the GPU spent in convolutions and GEMMs
(cuDNN/cuBLAS/CUTLASS kernels), in our Triton kernels (``_denoise_kernel``, ``_range_kernel``,
``_masked_kernel``), in anything else, and idle (wall time minus the union of the device events'
intervals). The wall time is measured around the profiled call, so it includes the profiler's own
overhead on the host. CPU (the dry run): the top operators by self CPU time, in the same groups.

    python benchmarks/profile_explain.py --precision bf16 --out-json gpu-out/profile.json --out-txt gpu-out/profile.txt

The classification is by kernel name (the rules are in :func:`category`); the raw top list is kept in
the JSON so it can be re-read.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_latency import MODELS, _device_name, _git_commit, _images, _versions, load_model, write_json  # noqa: E402

import unioncam  # noqa: E402

OURS = re.compile(r"_denoise_kernel|_range_kernel|_masked_kernel")
LAYOUT = re.compile(r"nchwtonhwc|nhwctonchw|transpose|permute|copy", re.I)
CONV_GEMM = re.compile(
    r"conv|gemm|xmma|cutlass|cudnn|implicit|winograd|wgrad|dgrad|fprop|nvjet|cublas|sm\d{2,3}_|"
    r"mkldnn|onednn|addmm|aten::mm\b|aten::bmm|aten::linear|aten::matmul",
    re.I,
)


def category(name: str) -> str:
    """``triton`` (ours), ``conv_gemm``, ``memcpy`` or ``other``, from a kernel's or operator's name."""
    if OURS.search(name):
        return "triton"
    low = name.lower()
    if low.startswith("memcpy") or low.startswith("memset"):
        return "memcpy"
    if LAYOUT.search(name) and "conv" not in low.replace("convert", ""):
        return "other"
    return "conv_gemm" if CONV_GEMM.search(name) else "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


def summarise(events, wall_s: float, device: torch.device, top: int) -> dict:
    """The profile's groups from ``prof.events()``; CUDA: device events, CPU: operators' self time."""
    from torch.autograd import DeviceType

    by_name: dict[str, dict] = {}
    intervals = []
    if device.type == "cuda":
        dev = [e for e in events if e.device_type == DeviceType.CUDA]
        for e in dev:
            dur = e.time_range.end - e.time_range.start
            intervals.append((e.time_range.start, e.time_range.end))
            rec = by_name.setdefault(e.name, {"name": e.name, "calls": 0, "us": 0.0})
            rec["calls"] += 1
            rec["us"] += dur
        busy_us = _union_us(intervals)
        source = "device events (kernels, memcpy, memset)"
    else:
        for e in events:
            if e.device_type != DeviceType.CPU:
                continue
            rec = by_name.setdefault(e.name, {"name": e.name, "calls": 0, "us": 0.0})
            rec["calls"] += 1
            rec["us"] += e.self_cpu_time_total
        busy_us = None
        source = "CPU operators, self time (no device)"
    total_us = sum(r["us"] for r in by_name.values())
    groups = {"conv_gemm": 0.0, "triton": 0.0, "memcpy": 0.0, "other": 0.0}
    for r in by_name.values():
        r["category"] = category(r["name"])
        groups[r["category"]] += r["us"]
    wall_us = wall_s * 1e6
    rows = sorted(by_name.values(), key=lambda r: -r["us"])
    out = {
        "source": source,
        "wall_s": wall_s,
        "events": sum(r["calls"] for r in rows),
        "distinct_names": len(rows),
        "total_event_s": total_us / 1e6,
        "group_s": {k: v / 1e6 for k, v in groups.items()},
        "top": [{**r, "s": r["us"] / 1e6, "share_of_events": r["us"] / total_us if total_us else None}
                for r in rows[:top]],
    }
    if busy_us is not None:
        out["busy_s"] = busy_us / 1e6
        out["idle_s"] = max(0.0, wall_us - busy_us) / 1e6
        # Shares of the wall time; event times can overlap a little (streams), busy is their union.
        share = {k: v / wall_us for k, v in groups.items()} if wall_us else {}
        share["idle"] = out["idle_s"] / wall_s if wall_s else None
        out["share_of_wall"] = share
    else:
        out["share_of_events"] = {k: (v / total_us if total_us else None) for k, v in groups.items()}
    return out


def _text(res: dict) -> str:
    p = res["profile"]
    lines = [
        f"{res['device']}: {res['settings']['method']} {res['settings']['precision']}, {res['settings']['model']} "
        f"{res['settings']['size']}², one image, wall {p['wall_s'] * 1e3:.1f} ms (profiled), "
        f"fastest unprofiled warm-up {res['unprofiled_median_s'] * 1e3:.1f} ms",
        f"source: {p['source']}; {p['events']} events, {p['distinct_names']} names",
    ]
    if "share_of_wall" in p:
        s = p["share_of_wall"]
        lines.append(
            "share of wall time: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in s.items() if v is not None)
            + f" (busy {p['busy_s'] * 1e3:.1f} ms)")
    else:
        lines.append("share of operator time: " + ", ".join(
            f"{k} {100 * v:.1f} %" for k, v in p["share_of_events"].items() if v is not None))
    lines.append(f"{'ms':>10} {'calls':>7} {'share':>7}  category   name")
    for r in p["top"]:
        share = "" if r["share_of_events"] is None else f"{100 * r['share_of_events']:.1f}%"
        lines.append(f"{r['s'] * 1e3:>10.3f} {r['calls']:>7} {share:>7}  {r['category']:<10} {r['name'][:140]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="unioncam")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--model", default="vgg16", choices=MODELS)
    ap.add_argument("--weights", default="random")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled calls first (also timed, for comparison)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-txt", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.model, args.weights, args.seed, device)
    image = _images(1, args.size, args.seed)[0].to(device)

    def call() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        unioncam.explain(model, image, method=args.method, precision=args.precision, batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = [call() for _ in range(max(1, args.warmup))]
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = call()
    t0 = time.perf_counter()
    summary = summarise(prof.events(), wall, device, args.top)
    res = {
        "device": _device_name(device),
        "device_type": device.type,
        "versions": _versions(),
        "commit": _git_commit(),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("out")},
        "warmup_s": warm,
        # the first calls autotune cuDNN and compile kernels: the fastest warm-up is the steady state
        "unprofiled_median_s": min(warm),
        "profile": summary,
        "analysis_s": time.perf_counter() - t0,
    }
    text = _text(res)
    print(text)
    write_json(Path(args.out_json), res)
    Path(args.out_txt).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
