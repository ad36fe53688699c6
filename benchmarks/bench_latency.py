"""Per-image latency and peak memory of UnionCAM: our fast path, our literal reference, and other libraries.

Same run, same device, same images, same pixel-space VGG16 for every entry:

- ``unioncam[-<precision>]``: ``unioncam.explain`` (or ``explain_batch`` with ``--throughput B``);
- ``scorecam[-<precision>]``: our Score-CAM (the region map alone), the like-for-like entry for the libraries;
- ``reference``: ``unioncam.reference.unioncam_reference`` (one masked forward per channel, unbatched);
- ``pytorch-grad-cam``: ``pytorch_grad_cam.ScoreCAM`` (``pip install grad-cam``), if installed;
- ``torchcam``: ``torchcam.methods.ScoreCAM`` (``pip install torchcam``), if installed.

Timing is device-synchronised wall time per image after ``--warmup`` untimed calls, the entries
taking turns call by call (so a busy shared machine slows all of them alike); memory is the peak over
the timed calls (CUDA: ``max_memory_allocated`` / ``max_memory_reserved``; CPU: peak RSS,
reset per entry through ``/proc/self/clear_refs`` where Linux allows it). Forwards are counted by a
hook on ``model.features``: every image that passes through the network counts, whoever sends it.

    python benchmarks/bench_latency.py                                  # CUDA if present: 224², 20 images
    python benchmarks/bench_latency.py --device cpu --size 64 --images 3 --warmup 1

Writes a JSON (device, versions, settings, raw timings) to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam prints a bar per batch otherwise

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import unioncam  # noqa: E402
from unioncam.core.scorer import DEFAULT_BATCH_SIZE, PRECISIONS  # noqa: E402
from unioncam.reference import unioncam_reference  # noqa: E402

#: The paper's figure for UnionCAM on VGG16, 224×224, one NVIDIA RTX A6000 (Hu et al. 2024, §4.2).
PAPER = {"seconds_per_image": 1.16, "memory_gb": 2.22, "device": "NVIDIA RTX A6000", "size": 224}
ENTRIES = ("unioncam", "scorecam", "reference", "pytorch-grad-cam", "torchcam")


# ------------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> str:
    """Start a fresh peak-memory window; says how CPU peaks are measured."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        return "rss-window"
    except OSError:
        return "rss-lifetime"  # the peak of the whole process so far (an upper bound)


def _peak(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "max_memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_rss_gb": int(line.split()[1]) / 2**20}
    except OSError:
        pass
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class _ForwardCounter:
    """Counts images through ``module`` (a hook, so it sees every caller's forwards)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _m: torch.nn.Module, inputs: tuple) -> None:
        self.count += int(inputs[0].shape[0])

    def close(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------------- the entries


def _ours(method: str, precision: str, batch_size: int) -> Callable:
    def run(model, images, targets):
        res = unioncam.explain_batch(model, images, targets=targets, method=method, batch_size=batch_size,
                                     precision=precision)
        return [r.details for r in res]

    return run


def _reference(model, images, targets):
    return [unioncam_reference(model, x, target=t).details for x, t in zip(images, targets)]


def _pytorch_grad_cam(batch_size: int) -> Callable | None:
    try:
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None

    def run(model, images, targets):
        cam = ScoreCAM(model=model, target_layers=[model.features[29]])
        cam.batch_size = batch_size
        try:
            for x, t in zip(images, targets):
                cam(input_tensor=x[None], targets=[ClassifierOutputTarget(t)])
        finally:
            cam.activations_and_grads.release()
        return [{} for _ in images]

    return run


def _torchcam(batch_size: int) -> Callable | None:
    try:
        from torchcam.methods import ScoreCAM
    except ImportError:
        return None

    def run(model, images, targets):
        with ScoreCAM(model, "features.29", batch_size=batch_size, input_shape=tuple(images[0].shape)) as ex:
            for x, t in zip(images, targets):
                with torch.no_grad():
                    model(x[None])
                ex(class_idx=t)
        return [{} for _ in images]

    return run


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "unioncam": unioncam.__version__}
    for dist in ("torch", "torchvision", "triton", "grad-cam", "torchcam", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def _git_commit() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (head + (" (with uncommitted changes)" if dirty else "")) or "unknown"
    except OSError:
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """The sample photos at ``size``×``size``, cycled; seeded noise where there are none."""
    photos = sorted((ROOT / "samples").glob("*.png"))
    if photos:
        return [unioncam.load_image(photos[i % len(photos)], size=size) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


# -------------------------------------------------------------------------------------------- the run


def _entries(args: argparse.Namespace) -> list[tuple[str, Callable | None]]:
    out: list[tuple[str, Callable | None]] = []
    for name in args.methods:
        if name in ("unioncam", "scorecam"):
            out += [(f"{name}-{p}", _ours(name, p, args.batch_size)) for p in args.precision]
        elif name == "reference":
            out.append(("reference", _reference))
        elif name == "pytorch-grad-cam":
            out.append((name, _pytorch_grad_cam(args.batch_size)))
        elif name == "torchcam":
            out.append((name, _torchcam(args.batch_size)))
    return out


class _Entry:
    """One benchmarked entry: its calls (one image, or ``--throughput`` images each) and what they measured."""

    def __init__(self, name: str, run: Callable, images: list, targets: list, throughput: int) -> None:
        self.name, self.run = name, run
        per_call = throughput if throughput > 1 and name.split("-")[0] in ("unioncam", "scorecam") else 1
        self.per_call = per_call
        self.calls = [(images[i:i + per_call], targets[i:i + per_call]) for i in range(0, len(images), per_call)]
        self.seconds: list[float] = []
        self.details: list[dict] = []
        self.peaks: dict[str, float] = {}
        self.peak_kind = ""
        self.forwards = 0

    def timed_call(self, k: int, model, device: torch.device) -> None:
        ims, ts = self.calls[k]
        counter = _ForwardCounter(model.features)
        _sync(device)
        self.peak_kind = _reset_peak(device)
        try:
            t0 = time.perf_counter()
            self.details += self.run(model, ims, ts)
            _sync(device)
            self.seconds += [(time.perf_counter() - t0) / len(ims)] * len(ims)
        finally:
            counter.close()
        self.forwards += counter.count
        for key, v in _peak(device).items():
            self.peaks[key] = max(v, self.peaks.get(key, 0.0))

    def row(self) -> dict:
        n = len(self.seconds)
        q = statistics.quantiles(self.seconds, n=10, method="inclusive") if n > 1 else [self.seconds[0]] * 9
        row = {
            "entry": self.name,
            "images": n,
            "images_per_call": self.per_call,
            "median_s": statistics.median(self.seconds),
            "p10_s": q[0],
            "p90_s": q[-1],
            "seconds": self.seconds,
            "network_forwards_per_image": self.forwards / n,
            "peak_memory_kind": self.peak_kind,
            **self.peaks,
        }
        masked = [d["masked_forwards"] for d in self.details if "masked_forwards" in d]
        if masked:
            row["masked_forwards_per_image"] = sum(masked) / len(masked)
            row["pruned_channels_per_image"] = (
                sum(d["channels"] - d["active_channels"] for d in self.details) / len(self.details))
        return row


def measure(entries: list[_Entry], model, args, device: torch.device) -> list[dict]:
    """Warm every entry up, then time them round-robin, call by call.

    Interleaving means a slow-down of a shared machine hits every entry alike rather than whichever
    happened to run at that moment. Peak memory is reset before each call and the maximum kept.
    """
    for e in entries:
        print(f"{e.name}: {args.warmup} warm-up call(s)", flush=True)
        for i in range(args.warmup):
            e.run(model, *e.calls[i % len(e.calls)])
    rounds = max(len(e.calls) for e in entries)
    for k in range(rounds):
        print(f"timed round {k + 1}/{rounds}", flush=True)
        for e in entries:
            if k < len(e.calls):
                e.timed_call(k, model, device)
    return [e.row() for e in entries]


def _table(rows: list[dict], device: torch.device, size: int) -> str:
    mem_key = "max_memory_allocated_gb" if device.type == "cuda" else "peak_rss_gb"
    base = next((r["median_s"] for r in rows if r["entry"] == "unioncam-fp32"), None)
    head = (f"{'entry':<20} {'median s/img':>12} {'p10':>8} {'p90':>8} {'peak GB':>8} {'fwd/img':>8} "
            f"{'pruned':>7} {'× unioncam-fp32':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['entry']:<20} skipped: {r['skipped']}")
            continue
        ratio = f"{r['median_s'] / base:.2f}" if base else "-"
        pruned = r.get("pruned_channels_per_image")
        lines.append(
            f"{r['entry']:<20} {r['median_s']:>12.3f} {r['p10_s']:>8.3f} {r['p90_s']:>8.3f} {r[mem_key]:>8.2f} "
            f"{r['network_forwards_per_image']:>8.0f} {'-' if pruned is None else f'{pruned:.0f}':>7} {ratio:>15}"
        )
    lines.append(
        f"{'paper (UnionCAM)':<20} {PAPER['seconds_per_image']:>12.2f} {'':>8} {'':>8} {PAPER['memory_gb']:>8.2f}"
        f"   ({PAPER['device']}, {PAPER['size']}×{PAPER['size']}; this run: {device.type}, {size}×{size})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20, help="timed images per entry")
    ap.add_argument("--size", type=int, default=224, help="square input side (paper: 224)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per entry first")
    ap.add_argument("--methods", default=",".join(ENTRIES), help=f"comma list from {','.join(ENTRIES)}")
    ap.add_argument("--precision", default="fp32,bf16", help=f"comma list from {','.join(PRECISIONS)} (ours only)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="masked inputs per forward, the same for every entry (default: the engine's for the "
                    "device: 64 on CUDA, 8 on CPU)")
    ap.add_argument("--throughput", type=int, default=1, help="images per explain_batch call (ours only)")
    ap.add_argument("--weights", default="random", help="'random', 'imagenet' or a state-dict path")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/latency-<device>-<size>.json)")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [m for m in args.methods if m not in ENTRIES] + [p for p in args.precision if p not in PRECISIONS]
    if bad or args.images < 1 or args.size < 32 or args.warmup < 0 or args.throughput < 1:
        ap.error(f"bad option(s): {bad or 'images ≥ 1, size ≥ 32, warmup ≥ 0, throughput ≥ 1'}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE.get(device.type, 64)

    model = unioncam.load_vgg16(args.weights, seed=args.seed, device=device)
    images = [x.to(device) for x in _images(args.images, args.size, args.seed)]
    with torch.no_grad():
        targets = [int(model(x[None]).argmax()) for x in images]

    entries, skipped = [], []
    for name, run in _entries(args):
        if run is None:
            skipped.append({"entry": name, "skipped": f"not installed (pip install {name.replace('pytorch-', '')})"})
            print(f"{name}: skipped, not installed", flush=True)
        else:
            entries.append(_Entry(name, run, images, targets, args.throughput))
    rows = (measure(entries, model, args, device) if entries else []) + skipped

    table = _table(rows, device, args.size)
    print(table)
    result = {
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "device_type": device.type,
        "versions": _versions(),
        "commit": _git_commit(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "paper": PAPER,
        "rows": rows,
        "table": table.splitlines(),
    }
    if device.type != "cuda":
        result["gpu"] = "not measured: no GPU was available for this run"
    default = ROOT / "benchmarks" / "results" / f"latency-{device.type}-{args.size}.json"
    write_json(Path(args.out) if args.out else default, result)
    return result


def write_json(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
