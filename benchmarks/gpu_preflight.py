"""Pre-flight of the GPU pass: device, driver, versions, commit, toolchain, the libraries, and the three
kernels against their torch twins.

On CUDA the public ops (``denoise``, ``upsampled_range``, ``masked_inputs``) run on VGG16-sized inputs
(``[2, 512, 14, 14]`` channels-last activations, 224² images): they launch the Triton kernels, and a
kernel that cannot be built or launched makes its op warn and fall back to the twin, which is caught here
and counted as a failure. With ``--interpret`` (CPU, ``TRITON_INTERPRET=1``, the dry run) the kernels'
``*_triton`` functions run through Triton's interpreter on small inputs instead. Each result is compared
with the twin at the kernel tests' tolerances, and timed against it (CUDA events, median of a few calls).

    python benchmarks/gpu_preflight.py --out gpu-out/preflight.json

Writes the JSON; ``kernels_ok`` is false when any kernel failed or disagreed (the GPU pass then sets
``UNIONCAM_TRITON=0`` for the rest). Exit status 0 unless the script itself breaks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_latency import _device_name, _git_commit, _versions, write_json  # noqa: E402

#: Kernel vs twin, as in tests/test_kernels.py: (rtol, atol) per op and output dtype.
TOLERANCES = {
    "denoise": (1e-5, 1e-6),
    "upsampled_range": (1e-6, 1e-6),
    "masked_inputs/float32": (1e-5, 1e-5),
    "masked_inputs/bfloat16": (2**-7, 1e-5),
    "masked_inputs/float16": (2**-10, 1e-5),
}
DISTS = ("torch", "torchvision", "triton", "numpy", "grad-cam", "torchcam", "ttach", "opencv-python",
         "opencv-python-headless", "scikit-learn", "scipy", "matplotlib", "pillow", "tqdm", "pytest")


def _run(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__}: {e})"


def environment() -> dict:
    """Versions, the GPU as nvidia-smi sees it, and what Triton needs to build a launcher."""
    dists = {}
    for d in DISTS:
        try:
            dists[d] = md.version(d)
        except md.PackageNotFoundError:
            dists[d] = None
    scheme = sysconfig.get_default_scheme()
    inc = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    libcuda = _run(["/sbin/ldconfig", "-p"])
    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "distributions": dists,
        "versions": _versions(),
        "commit": _git_commit(),
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                            "power.limit,compute_cap", "--format=csv"]) if shutil.which("nvidia-smi") else None,
        "c_compiler": os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang"),
        "python_h": os.path.exists(os.path.join(inc, "Python.h")),
        "libcuda": [ln.split()[-1] for ln in libcuda.splitlines() if "libcuda.so.1" in ln] or libcuda[:200],
        "environment": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "UNIONCAM_TRITON", "CUDA_VISIBLE_DEVICES",
                                                         "TRITON_CACHE_DIR", "PYTHONPATH")},
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=_device_name(torch.device("cuda")),
            capability=list(torch.cuda.get_device_capability(0)),
            memory_gb=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            driver=_driver(),
        )
    else:
        env["device"] = _device_name(torch.device("cpu"))
    return env


def _driver() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out and "unavailable" not in out else None


def peers() -> dict:
    out = {}
    for mod in ("pytorch_grad_cam", "torchcam.methods"):
        try:
            importlib.import_module(mod)
            out[mod] = "imports"
        except Exception as e:  # noqa: BLE001
            out[mod] = f"does not import: {type(e).__name__}: {e}"
    return out


def _inputs(device: torch.device, interpret: bool):
    g = torch.Generator().manual_seed(0)
    B, K, h, size = (2, 512, 14, 224) if not interpret else (1, 16, 4, 32)
    acts = torch.randn(B, K, h, h, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    grads = torch.randn(B, K, h, h, generator=g).to(device)
    grads[grads.abs() < 0.5] = 0.0
    images = torch.rand(B, 3, size, size, generator=g).to(device)
    n = 64 if not interpret else 6
    bi = torch.randint(0, B, (n,), generator=g).to(device)
    ki = torch.randint(0, K, (n,), generator=g).to(device)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).to(device)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1).to(device)
    return acts, grads, images, bi, ki, (mean, std), (size, size)


def _time(fn, device: torch.device, reps: int) -> float | None:
    """Median seconds of ``fn()`` over ``reps`` calls (after the calls already made)."""
    if reps < 1:
        return None
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    rtol, atol = TOLERANCES[name]
    got, want = got.float().cpu(), want.float().cpu()
    diff = (got - want).abs()
    return {"max_abs_diff": float(diff.max()) if diff.numel() else 0.0, "rtol": rtol, "atol": atol,
            "ok": bool(torch.allclose(got, want, rtol=rtol, atol=atol))}


def kernels(device: torch.device, interpret: bool, reps: int) -> dict:
    """Each kernel against its twin; ``{"ok": bool, "ops": {...}}``."""
    from unioncam.kernels import (
        denoise,
        denoise_torch,
        masked_inputs,
        masked_inputs_torch,
        upsampled_range,
        upsampled_range_torch,
    )

    if interpret:  # the public ops take the twin for CPU tensors: call the kernels themselves
        den = importlib.import_module("unioncam.kernels.denoise").denoise_triton
        masks = importlib.import_module("unioncam.kernels.masks")
        rng, msk = masks.upsampled_range_triton, masks.masked_inputs_triton
        denoise, upsampled_range = den, rng  # noqa: F811

        def masked_inputs(*a):  # noqa: F811 - the public op's layout on the Triton path
            return msk(*a, channels_last=True)

    acts, grads, images, bi, ki, norm, size = _inputs(device, interpret)
    ops: dict[str, dict] = {}

    def check(op: str, fn, twin, compare) -> None:
        rec: dict = {}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            rec["first_call_s"] = time.perf_counter() - t0  # JIT compile and launcher build included
            fell_back = [str(w.message) for w in caught if "failed to build or launch" in str(w.message)]
            failed = getattr(importlib.import_module("unioncam.kernels._triton"), "_FAILED", {})
            base = op.split("/")[0]
            if fell_back or base in failed:
                rec.update(ok=False, error="kernel fell back to its twin: " + (fell_back[0] if fell_back else
                                                                                failed[base]))
            else:
                want = twin()
                rec.update(compare(got, want))
                rec["kernel_s"] = _time(fn, device, reps)
                rec["twin_s"] = _time(twin, device, reps)
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:3000], traceback=traceback.format_exc()[-3000:])
        ops[op] = rec
        print(f"{op}: {'ok' if rec.get('ok') else 'FAILED'} {rec}", flush=True)

    def cmp_denoise(got, want):
        r = _close("denoise", got[0], want[0])
        r["removed_equal"] = bool(torch.equal(got[1].cpu(), want[1].cpu()) and torch.equal(got[2].cpu(),
                                                                                          want[2].cpu()))
        r["ok"] = r["ok"] and r["removed_equal"]
        return r

    def cmp_range(got, want):
        lo, hi = _close("upsampled_range", got[0], want[0]), _close("upsampled_range", got[1], want[1])
        return {"lo": lo, "hi": hi, "ok": lo["ok"] and hi["ok"],
                "max_abs_diff": max(lo["max_abs_diff"], hi["max_abs_diff"])}

    check("denoise", lambda: denoise(grads, acts, 10.0), lambda: denoise_torch(grads, acts, 10.0), cmp_denoise)
    check("upsampled_range", lambda: upsampled_range(acts, size), lambda: upsampled_range_torch(acts, size),
          cmp_range)
    lo, hi = upsampled_range_torch(acts, size)
    lo, hi = lo[bi, ki], hi[bi, ki]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        name = f"masked_inputs/{str(dt).split('.')[-1]}"
        args = (images, acts, bi, ki, lo, hi, dt, norm)
        check(name, lambda args=args: masked_inputs(*args), lambda args=args: masked_inputs_torch(*args),
              lambda got, want, name=name: _close(name, got, want))
    return {"ok": all(r.get("ok") for r in ops.values()), "ops": ops,
            "path": "Triton interpreter on CPU" if interpret else "compiled kernels on CUDA (public ops)",
            "shapes": {"acts": list(acts.shape), "images": list(images.shape), "masked_inputs": int(bi.numel())}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON path")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per kernel and twin")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    t0 = time.perf_counter()
    result = {"environment": environment(), "peers": peers(), "device_type": device.type}
    print(result, flush=True)
    if device.type == "cuda" and interpret:
        result["kernels"] = {"ok": False, "ops": {}, "error": "TRITON_INTERPRET=1 on CUDA compiles nothing"}
    elif device.type != "cuda" and not interpret:
        result["kernels"] = {"ok": None, "ops": {}, "error": "no CUDA and no interpreter: kernels not run"}
    else:
        result["kernels"] = kernels(device, interpret, args.reps if device.type == "cuda" else 1)
    result["kernels_ok"] = result["kernels"]["ok"]
    result["seconds"] = time.perf_counter() - t0
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
