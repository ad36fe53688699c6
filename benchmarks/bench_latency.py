"""Per-image latency and peak memory of UnionCAM: our fast path, our literal reference, and other libraries.

Same run, same device, same images, same pixel-space model (VGG16 by default) for every entry:

- ``unioncam-<precision>``: ``unioncam.explain`` (or ``explain_batch`` with ``--throughput B``);
- ``scorecam-<precision>``: our Score-CAM (the region map alone), the like-for-like entry for the libraries;
- ``reference-<precision>``: ``unioncam.reference.unioncam_reference`` (one masked forward per channel,
  unbatched), at the first ``--peer-precision``, on the first ``--reference-images`` images only;
- ``pytorch-grad-cam-<precision>``: ``pytorch_grad_cam.ScoreCAM`` (``pip install grad-cam``), if it imports;
- ``torchcam-<precision>``: ``torchcam.methods.ScoreCAM`` (``pip install torchcam``), if it imports.

Precisions: ``fp32`` is strict float32 for every entry (TF32 off on CUDA: the reference's and the
libraries' calls run inside ``unioncam.core.backend_flags(device, "fp32")``, as ours do), ``tf32`` lets
CUDA round matmul/convolution inputs to TF32 (torch's default for convolutions); ``bf16``/``fp16`` are
ours only. With several ``--batch-size`` values every entry of ours is repeated per value (``-bs<N>``).

Timing is device-synchronised wall time per image after ``--warmup`` untimed calls, the entries
taking turns call by call (so a busy shared machine slows all of them alike; ``--sequential``: each
entry whole, one after the other, so that a run cut short keeps the entries it finished). In throughput mode
(``--throughput B``) the image list is rounded up to a multiple of ``B`` so that every call, the last
one included, has the shape the warm-up calls compiled and autotuned. A hook on ``model.features``
counts the images through the network (whoever sends them) and notes every new input shape/dtype
(cuDNN autotunes and Triton compiles per shape): ``timed_calls_with_new_shapes`` says how many timed
calls met a shape no earlier call had (0 is what a clean measurement needs).

Memory. CUDA: after the timed rounds, one more (untimed) call per entry, preceded by
``torch.cuda.empty_cache()`` and ``reset_peak_memory_stats()`` so that nothing reserved by another entry
carries over: ``max_memory_allocated`` / ``max_memory_reserved`` of that call, ``resident_gb`` (what
was allocated when it began: the model's weights, the images), the weights' bytes counted from the
parameters (``weights_gb``; ``half_weight_copy_gb``: the bf16/fp16 copy of the convolutions' and
linear layers' weights, the head excepted, that our scorer makes for a half-precision call) and the
working set ``peak − resident − half copy``. CPU: peak RSS over the timed calls, reset per call
through ``/proc/self/clear_refs`` where Linux allows it.

    python benchmarks/bench_latency.py                                  # CUDA if present: 224², 20 images
    python benchmarks/bench_latency.py --device cpu --size 64 --images 3 --warmup 1

Writes a JSON (device, versions, settings, raw timings) to ``benchmarks/results/`` (or ``--out``),
rewritten after the warm-up and after every timed round (``"complete": false`` until the end), so a run
cut short still leaves what it measured.
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
from unioncam.core import backend_flags  # noqa: E402
from unioncam.core.scorer import DEFAULT_BATCH_SIZE, default_batch_size  # noqa: E402
from unioncam.reference import unioncam_reference  # noqa: E402
from unioncam.validation import PRECISIONS  # noqa: E402

#: The paper's figure for UnionCAM on VGG16, 224×224, one NVIDIA RTX A6000 (Hu et al. 2024, §4.2).
PAPER = {"seconds_per_image": 1.16, "memory_gb": 2.22, "device": "NVIDIA RTX A6000", "size": 224}
ENTRIES = ("unioncam", "scorecam", "reference", "pytorch-grad-cam", "torchcam")
PEERS = ("pytorch-grad-cam", "torchcam")
#: Precisions the reference and the libraries can run at (they have no half-precision path of ours).
PEER_PRECISIONS = ("fp32", "tf32")
MODELS = ("vgg16", "shapes")


# ------------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> str:
    """Start a fresh peak-memory window; says how peaks are measured."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # reserved memory of earlier calls must not count for this one
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


def _tf32_state() -> str:
    """The cuDNN float32 convolution mode now in force (part of cuDNN's autotuning key)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return str(conv.fp32_precision)
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


class _Watcher:
    """A hook on ``module``: counts the images through it and notes every new input shape.

    The key of a shape is what cuDNN's autotuning and Triton's specialisation depend on: the input's
    shape, dtype and layout, the autocast dtype in force and the float32 convolution mode. ``new``
    counts the keys first met since the last :meth:`start`.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self.new = 0
        self.seen: set = set()
        self._handle = module.register_forward_pre_hook(self._hook)

    def start(self) -> None:
        self.count = 0
        self.new = 0

    def _hook(self, _m: torch.nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        self.count += int(x.shape[0])
        dev = x.device.type
        auto = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        key = (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), auto, _tf32_state())
        if key not in self.seen:
            self.seen.add(key)
            self.new += 1

    def close(self) -> None:
        self._handle.remove()


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers, and of the half-precision copy our scorer makes.

    The copy (``unioncam.core.Scorer``) holds the convolutions' and linear layers' parameters in the
    autocast dtype, the model's last ``nn.Linear`` (its head, kept float32) excepted: 2 bytes a value.
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    head = next((m for m in reversed(list(model.modules())) if isinstance(m, torch.nn.Linear)), None)
    low = 0
    for mod in model.modules():
        if mod is head or not isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            continue
        low += sum(p.numel() * 2 for p in mod.parameters(recurse=False) if p.is_floating_point())
    return {"params": params, "buffers": buffers, "half_copy": low}


# --------------------------------------------------------------------------------------- the entries


def _ours(method: str, precision: str, batch_size: int) -> Callable:
    def run(model, images, targets):
        res = unioncam.explain_batch(model, images, targets=targets, method=method, batch_size=batch_size,
                                     precision=precision)
        return [r.details for r in res]

    return run


def _reference(precision: str) -> Callable:
    def run(model, images, targets):
        with backend_flags(images[0].device, precision):
            return [unioncam_reference(model, x, target=t).details for x, t in zip(images, targets)]

    return run


def _layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    name = model.default_layer
    return name, dict(model.named_modules())[name]


def _pytorch_grad_cam(batch_size: int, precision: str) -> tuple[Callable | None, str]:
    try:
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except Exception as e:  # noqa: BLE001 - missing, or broken by a dependency: either way not measured
        return None, f"does not import ({type(e).__name__}: {e}); pip install grad-cam"

    def run(model, images, targets):
        cam = ScoreCAM(model=model, target_layers=[_layer(model)[1]])
        cam.batch_size = batch_size
        try:
            with backend_flags(images[0].device, precision):
                for x, t in zip(images, targets):
                    cam(input_tensor=x[None], targets=[ClassifierOutputTarget(t)])
        finally:
            cam.activations_and_grads.release()
        return [{} for _ in images]

    return run, ""


def _torchcam(batch_size: int, precision: str) -> tuple[Callable | None, str]:
    try:
        from torchcam.methods import ScoreCAM
    except Exception as e:  # noqa: BLE001
        return None, f"does not import ({type(e).__name__}: {e}); pip install torchcam"

    def run(model, images, targets):
        with backend_flags(images[0].device, precision), ScoreCAM(
            model, _layer(model)[0], batch_size=batch_size, input_shape=tuple(images[0].shape)
        ) as ex:
            for x, t in zip(images, targets):
                with torch.no_grad():
                    model(x[None])
                ex(class_idx=t)
        return [{} for _ in images]

    return run, ""


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "unioncam": unioncam.__version__}
    for dist in ("torch", "torchvision", "triton", "grad-cam", "torchcam", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    return out


def _git_commit() -> str:
    """``$UNIONCAM_COMMIT`` when set (a copy of the tree whose ``.git``, if any, may be stale), else HEAD
    and whether tracked files differ."""
    import subprocess

    given = os.environ.get("UNIONCAM_COMMIT", "").strip()
    if given:
        return f"{given} (from UNIONCAM_COMMIT)"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        if head:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
            return head + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        pass
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


def load_model(name: str, weights: str, seed: int, device: torch.device) -> torch.nn.Module:
    """``vgg16`` (``weights``: random / imagenet / a path) or the small trained ``shapes`` CNN."""
    if name == "shapes":
        from unioncam.models import load_shapes_cnn

        return load_shapes_cnn(device=device)
    return unioncam.load_vgg16(weights, seed=seed, device=device)


# -------------------------------------------------------------------------------------------- the run


def _entries(args: argparse.Namespace) -> list[tuple[str, Callable | None, str]]:
    """``(name, run or None, why not)`` for every entry asked for."""
    out: list[tuple[str, Callable | None, str]] = []
    many = len(args.batch_size) > 1
    for name in args.methods:
        if name in ("unioncam", "scorecam"):
            for bs in args.batch_size:
                out += [(f"{name}-{p}" + (f"-bs{bs}" if many else ""), _ours(name, p, bs), "")
                        for p in args.precision]
        elif name == "reference":
            p = args.peer_precision[0]  # one precision: the literal loop is slow
            out.append((f"reference-{p}", _reference(p), ""))
        else:
            factory = _pytorch_grad_cam if name == "pytorch-grad-cam" else _torchcam
            for p in args.peer_precision:
                out.append((f"{name}-{p}", *factory(args.batch_size[0], p)))
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
        self.memory: dict[str, float] = {}
        self.peak_kind = ""
        self.forwards = 0
        self.new_shape_calls = 0
        self.error = ""

    def timed_call(self, k: int, model, device: torch.device, watcher: _Watcher) -> None:
        ims, ts = self.calls[k]
        _sync(device)
        if device.type != "cuda":  # CUDA memory is measured by memory_call, apart from the timings
            self.peak_kind = _reset_peak(device)
        watcher.start()
        t0 = time.perf_counter()
        self.details += self.run(model, ims, ts)
        _sync(device)
        self.seconds += [(time.perf_counter() - t0) / len(ims)] * len(ims)
        self.forwards += watcher.count
        self.new_shape_calls += watcher.new > 0
        if device.type != "cuda":
            for key, v in _peak(device).items():
                self.peaks[key] = max(v, self.peaks.get(key, 0.0))

    def memory_call(self, model, device: torch.device, weights: dict[str, int]) -> None:
        """One untimed call (the first), alone in a fresh CUDA memory window."""
        ims, ts = self.calls[0]
        _sync(device)
        self.peak_kind = _reset_peak(device)
        resident = torch.cuda.memory_allocated(device)
        self.run(model, ims, ts)
        _sync(device)
        peaks = _peak(device)
        method, precision = (self.name.split("-") + [""])[:2]
        half = weights["half_copy"] if method in ("unioncam", "scorecam") and precision in ("bf16", "fp16") else 0
        self.memory = {
            **peaks,
            "resident_gb": resident / 2**30,
            "weights_gb": (weights["params"] + weights["buffers"]) / 2**30,
            "half_weight_copy_gb": half / 2**30,
            "working_set_gb": (torch.cuda.max_memory_allocated(device) - resident - half) / 2**30,
            "images_in_memory_call": len(ims),
        }

    def row(self) -> dict:
        n = len(self.seconds)
        row: dict = {"entry": self.name, "images": n, "images_per_call": self.per_call}
        if self.error:
            row["error"] = self.error
        if n:
            q = statistics.quantiles(self.seconds, n=10, method="inclusive") if n > 1 else [self.seconds[0]] * 9
            row.update(
                median_s=statistics.median(self.seconds),
                p10_s=q[0],
                p90_s=q[-1],
                seconds=self.seconds,
                network_forwards_per_image=self.forwards / n,
                timed_calls=len(self.seconds) // self.per_call,
                timed_calls_with_new_shapes=self.new_shape_calls,
            )
        row["peak_memory_kind"] = self.peak_kind
        row.update(self.peaks)
        row.update(self.memory)
        masked = [d["masked_forwards"] for d in self.details if "masked_forwards" in d]
        if masked:
            row["masked_forwards_per_image"] = sum(masked) / len(masked)
            row["pruned_channels_per_image"] = (
                sum(d["channels"] - d["active_channels"] for d in self.details) / len(self.details))
        return row


def _guarded(e: _Entry, what: str, fn: Callable[[], None]) -> None:
    """Runs ``fn``; an error (a library's bug, out of memory) is recorded and ends that entry only."""
    if e.error:
        return
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one broken entry must not lose the others' figures
        e.error = f"{what}: {type(exc).__name__}: {str(exc)[:500]}"
        print(f"{e.name}: {e.error}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(entries: list[_Entry], model, args, device: torch.device,
            checkpoint: Callable[[list[dict], bool], None] | None = None) -> list[dict]:
    """Warm every entry up, then time them round-robin, call by call; then (CUDA) one memory call each.

    Interleaving means a slow-down of a shared machine hits every entry alike rather than whichever
    happened to run at that moment. ``checkpoint(rows, complete)`` is called after the warm-up and
    after every round.
    """
    watcher = _Watcher(model.features)
    weights = weight_bytes(model)
    if getattr(args, "sequential", False):  # each entry whole, one after the other: a cut-off run keeps the done ones
        try:
            for e in entries:
                print(f"{e.name}: {args.warmup} warm-up call(s), then {len(e.calls)} timed", flush=True)
                for i in range(args.warmup):
                    _guarded(e, "warm-up", lambda i=i: e.run(model, *e.calls[i % len(e.calls)]))
                for k in range(len(e.calls)):
                    _guarded(e, f"timed call {k}", lambda k=k: e.timed_call(k, model, device, watcher))
                if device.type == "cuda":
                    _guarded(e, "memory call", lambda: e.memory_call(model, device, weights))
                if checkpoint:
                    checkpoint([x.row() for x in entries if x.seconds or x.error], False)
        finally:
            watcher.close()
        return [e.row() for e in entries]
    try:
        for e in entries:
            print(f"{e.name}: {args.warmup} warm-up call(s)", flush=True)
            for i in range(args.warmup):
                _guarded(e, "warm-up", lambda i=i: e.run(model, *e.calls[i % len(e.calls)]))
        if checkpoint:
            checkpoint([e.row() for e in entries], False)
        rounds = max(len(e.calls) for e in entries)
        for k in range(rounds):
            print(f"timed round {k + 1}/{rounds}", flush=True)
            for e in entries:
                if k < len(e.calls):
                    _guarded(e, f"timed call {k}", lambda k=k: e.timed_call(k, model, device, watcher))
            if checkpoint:
                checkpoint([e.row() for e in entries], False)
        if device.type == "cuda":
            print("memory: one call per entry, each in a fresh window", flush=True)
            for e in entries:
                _guarded(e, "memory call", lambda: e.memory_call(model, device, weights))
    finally:
        watcher.close()
    return [e.row() for e in entries]


def _table(rows: list[dict], device: torch.device, size: int) -> str:
    mem_key = "max_memory_allocated_gb" if device.type == "cuda" else "peak_rss_gb"
    base = next((r["median_s"] for r in rows if r["entry"].startswith("unioncam-fp32") and "median_s" in r), None)
    head = (f"{'entry':<24} {'median s/img':>12} {'p10':>8} {'p90':>8} {'peak GB':>8} {'fwd/img':>8} "
            f"{'pruned':>7} {'speed-up':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['entry']:<24} skipped: {r['skipped']}")
            continue
        if "median_s" not in r:
            lines.append(f"{r['entry']:<24} not measured: {r.get('error', 'no timed call')}")
            continue
        ratio = f"{base / r['median_s']:.2f}" if base else "-"
        pruned = r.get("pruned_channels_per_image")
        mem = r.get(mem_key)
        lines.append(
            f"{r['entry']:<24} {r['median_s']:>12.4f} {r['p10_s']:>8.4f} {r['p90_s']:>8.4f} "
            f"{'-' if mem is None else f'{mem:.2f}':>8} "
            f"{r['network_forwards_per_image']:>8.0f} {'-' if pruned is None else f'{pruned:.0f}':>7} {ratio:>15}"
            + (f"  ERROR {r['error']}" if "error" in r else "")
        )
    lines.append(
        f"{'paper (UnionCAM)':<24} {PAPER['seconds_per_image']:>12.2f} {'':>8} {'':>8} {PAPER['memory_gb']:>8.2f}"
        f"   ({PAPER['device']}, {PAPER['size']}×{PAPER['size']}; this run: {device.type}, {size}×{size})"
    )
    lines.append("speed-up: unioncam-fp32's median over the entry's (> 1: the entry is faster)")
    return "\n".join(lines)


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20, help="timed images per entry")
    ap.add_argument("--reference-images", type=int, default=None,
                    help="timed images for the literal reference (default: --images)")
    ap.add_argument("--size", type=int, default=224, help="square input side (paper: 224)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per entry first")
    ap.add_argument("--methods", default=",".join(ENTRIES), help=f"comma list from {','.join(ENTRIES)}")
    ap.add_argument("--precision", default="fp32,bf16", help=f"comma list from {','.join(PRECISIONS)} (ours)")
    ap.add_argument("--peer-precision", default="fp32",
                    help=f"comma list from {','.join(PEER_PRECISIONS)} (the reference and the libraries)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--batch-size", default=None,
                    help="masked inputs per forward, the same for every entry; a comma list repeats ours per "
                    "value (the libraries take the first) (default: the engine's for the device: "
                    f"{DEFAULT_BATCH_SIZE} at 224², on a CPU more for smaller images)")
    ap.add_argument("--sequential", action="store_true",
                    help="time each entry whole before the next (default: round-robin, call by call)")
    ap.add_argument("--throughput", type=int, default=1, help="images per explain_batch call (ours only)")
    ap.add_argument("--model", default="vgg16", choices=MODELS, help="vgg16, or the small trained shapes CNN")
    ap.add_argument("--weights", default="random", help="vgg16: 'random', 'imagenet' or a state-dict path")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/latency-<device>-<size>.json)")
    args = ap.parse_args(argv)
    args.methods = _list(args.methods)
    args.precision = _list(args.precision)
    args.peer_precision = _list(args.peer_precision)
    try:
        args.batch_size = [int(b) for b in _list(args.batch_size)] if args.batch_size else []
    except ValueError:
        ap.error(f"--batch-size {args.batch_size!r}: integers, comma-separated")
    bad = ([m for m in args.methods if m not in ENTRIES] + [p for p in args.precision if p not in PRECISIONS]
           + [p for p in args.peer_precision if p not in PEER_PRECISIONS])
    if bad or args.images < 1 or args.size < 32 or args.warmup < 0 or args.throughput < 1 or any(
            b < 1 for b in args.batch_size):
        ap.error(f"bad option(s): {bad or 'images ≥ 1, size ≥ 32, warmup ≥ 0, throughput ≥ 1, batch sizes ≥ 1'}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.batch_size:  # the engine's own choice for this device and size, given to every entry
        args.batch_size = [default_batch_size(device, (args.size, args.size))]
    # Throughput mode: whole calls only, so the last timed call has the warmed-up shape.
    n_images = args.images
    if args.throughput > 1 and n_images % args.throughput:
        n_images += args.throughput - n_images % args.throughput
        print(f"--throughput {args.throughput}: {n_images} images (rounded up from {args.images}) so that every "
              "call has the same shape", flush=True)
    args.images_timed = n_images

    model = load_model(args.model, args.weights, args.seed, device)
    images = [x.to(device) for x in _images(n_images, args.size, args.seed)]
    with torch.no_grad():
        targets = [int(model(x[None]).argmax()) for x in images]

    entries, skipped = [], []
    for name, run, why in _entries(args):
        if run is None:
            skipped.append({"entry": name, "skipped": why})
            print(f"{name}: skipped, {why}", flush=True)
            continue
        n = args.reference_images if name.startswith("reference") and args.reference_images else n_images
        entries.append(_Entry(name, run, images[:n], targets[:n], args.throughput))

    default = ROOT / "benchmarks" / "results" / f"latency-{device.type}-{args.size}.json"
    out = Path(args.out) if args.out else default
    weights = weight_bytes(model)

    def result(rows: list[dict], complete: bool) -> dict:
        res = {
            "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete,
            "device": _device_name(device),
            "device_type": device.type,
            "versions": _versions(),
            "commit": _git_commit(),
            "unioncam_triton": os.environ.get("UNIONCAM_TRITON", "(unset: kernels where possible)"),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "model_bytes": weights,
            "paper": PAPER,
            "rows": rows + skipped,
        }
        if device.type != "cuda":
            res["gpu"] = "not measured: no GPU was available for this run"
        return res

    def checkpoint(rows: list[dict], complete: bool) -> None:
        write_json(out, result(rows, complete), quiet=True)

    rows = measure(entries, model, args, device, checkpoint) if entries else []
    table = _table(rows + skipped, device, args.size)
    print(table)
    final = result(rows, True)
    final["table"] = table.splitlines()
    write_json(out, final)
    return final


def write_json(out: Path, result: dict, quiet: bool = False) -> None:
    """Writes ``result`` to ``out`` whole (through a temporary file, so a reader never sees half of it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    if not quiet:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
