"""One command that benchmarks a GPU: every figure the README needs, in one folder, in under 8 minutes.

Run from the repository root with the machine's own Python (nothing needs installing: the repository is
put on ``PYTHONPATH``; the libraries compared against are installed from wheels in ``.whl/``, if any,
into a scratch folder):

    bash benchmarks/gpu_check.sh                    # = python benchmarks/gpu_check.py; files in $OUT or gpu-out/
    python benchmarks/gpu_check.py --dry-run        # the same steps on CPU, small, in a few minutes

Steps, each in its own process with its own time limit; none starts once ``--budget`` seconds have
passed since the start (and none is given more than what is left of it):

1. ``preflight``: device, driver, versions, commit; the three Triton kernels against their torch twins.
   A kernel that fails or disagrees sets ``UNIONCAM_TRITON=0`` (the torch twins) for the benchmarks.
2. ``latency``: VGG16 (random weights), 224², per image: ours UnionCAM at fp32 (strict) / tf32 / bf16 /
   fp16, our Score-CAM likewise, the literal reference (2 images), pytorch-grad-cam's and torchcam's
   ScoreCAM at strict fp32 and at tf32. Median, p10–p90, memory (weights apart from the working set).
3. ``ab``: the fast path's A/B (``benchmarks/gpu_ab.py``): today's path against CUDA graphs, all switches,
   ``torch.compile``, fixed chunks, pool-first and all at 128 inputs per forward (in that order), same
   images, each variant in a process of its own with cold compile caches, its row written as it ends.
4. ``serving``: the TorchServe handler in-process on the GPU (``benchmarks/gpu_serving.py``): its traps,
   32 UnionCAM + 32 prediction requests in TorchServe's batches against ``unioncam.explain``, then its
   handler tests in a subprocess limited to what is left of the step.
5. ``kernel-tests``: ``tests/test_kernels*.py`` on the compiled kernels (pytest's output and JUnit XML).
6. ``throughput``: ours, 8 images per call, every call the same shape.
7. ``precision``: bf16 and fp16 maps (UnionCAM, Score-CAM) against strict fp32 ones (VGG16).
8. ``profile``: ``torch.profiler`` of one UnionCAM bf16 explanation: top CUDA kernels, GPU time shares.
9. ``batch-sweep``: ours UnionCAM bf16 at 16 / 32 / 64 / 128 masked inputs per forward (dry run: also fp32).
10. ``summary.md``: device, driver, versions, commit and every figure, ready for the README.

Files (all in ``--out``): ``gpu_check.log``, ``steps.json``, ``<step>.log`` for every step,
``preflight.json``, ``latency.json``, ``ab.json``, ``serving.json``, ``throughput.json``, ``batch-sweep.json``,
``precision-unioncam.json``, ``precision-scorecam.json``, ``profile.json``, ``profile.txt``, ``kernel-tests.xml``,
``summary.md``;
with ``--pack`` all but ``summary.md``, ``gpu_check.log`` and ``steps.json`` go into ``results.tar.gz``.
``--dry-run`` runs the same steps on CPU: the small trained ShapesCNN at 32² (a VGG16 explanation takes
20–30 s on a 2-core CPU even at 32²), one or two images, kernels through Triton's interpreter, the
kernel tests of ``tests/test_kernels_dispatch.py`` only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.metadata as md
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: Seconds kept free at the end of the budget for the summary.
RESERVE_S = 5
#: A step is not started with less than this many seconds left.
MIN_STEP_S = 20
#: Seconds of the A/B step's variants (``gpu_ab.py --budget``); the step's limit is 10 s more (the table).
AB_BUDGET_S = 180
#: The environment variable that tells a step its limit (seconds from its start), cut to what was left of
#: the pass's budget: a step that divides its time among parts (serving, ab) fits them inside it.
STEP_LIMIT_ENV = "UNIONCAM_STEP_LIMIT_S"


@dataclass
class Step:
    name: str
    limit_s: int
    argv: list[str]
    outputs: list[str]
    env: dict[str, str] = field(default_factory=dict)
    kernels_switch: bool = True  # honours UNIONCAM_TRITON=0 after a failed pre-flight


def _steps(a: argparse.Namespace, out: Path) -> list[Step]:
    py = a.python
    o = str(out)
    if a.dry_run:
        model = ["--model", a.model or "shapes", "--size", "32", "--device", "cpu", "--threads", "2"]
        lat = model + ["--images", "1", "--reference-images", "1", "--warmup", "1"]
        ours = "fp32,tf32,bf16"
        tp, sweep = ["--throughput", "2", "--images", "2"], ["--batch-size", "8,16", "--images", "1"]
        tp_precisions = "fp32,bf16"
        deselect: list[str] = []
        prec = ["--model", a.model or "shapes", "--size", "32", "--images", "2", "--device", "cpu", "--threads", "2"]
        prof = model + ["--warmup", "1"]
        tests = [str(ROOT / "tests" / "test_kernels_dispatch.py")]
        test_env: dict[str, str] = {}
        ab = ["--dry-run", "--threads", "2", "--budget", str(AB_BUDGET_S)]
        sweep_prec = "bf16,fp32"
    else:
        model = ["--model", a.model or "vgg16", "--size", "224"]
        # Repeats trimmed (8 → 6 images, throughput 16 → 8, precision 6 → 4) to leave the A/B step its time
        # within the 8 minutes (the H100 pass of 2026-11-27: latency 106 s, throughput 65 s, precision 80 s).
        lat = model + ["--images", "6", "--reference-images", "2", "--warmup", "2"]
        ours = "fp32,tf32,bf16,fp16"
        tp, sweep = ["--throughput", "8", "--images", "8"], ["--batch-size", "16,32,64,128", "--images", "2"]
        tp_precisions = "bf16,fp16"  # the throughput target concerns half precision; fp32/tf32 cost minutes
        # Two CPU-side tests (an offline sm_90 build, a subprocess without Triton) that CI runs anyway.
        deselect = ["-k", "not test_kernels_compile_for_hopper and not test_package_works_without_triton"]
        prec = ["--model", a.model or "vgg16", "--size", "224", "--images", "4"]
        prof = model + ["--warmup", "3"]
        tests = sorted(glob.glob(str(ROOT / "tests" / "test_kernels*.py")))
        test_env = {"UNIONCAM_TEST_DEVICE": "cuda"}
        ab = ["--model", a.model or "vgg16", "--size", "224", "--images", "6", "--budget", str(AB_BUDGET_S)]
        sweep_prec = "bf16"  # the default precision on CUDA: its chunk is the one to choose
    bl, bp = str(BENCH / "bench_latency.py"), str(BENCH / "bench_precision.py")
    # Ordered by what the figures are worth against what they risk: the batch-size sweep (many new shapes,
    # each autotuned) goes last and runs its entries one after the other, so a cut-off sweep keeps some.
    # Limits (H100 pass of 2026-11-27 in brackets): preflight 45 (26 s), latency 120 (106 s with 10 images, 6
    # now), ab 190 (a process per variant, cold compiles), serving 90, kernel-tests 90 (48 s on the H200),
    # throughput 60 (65 s with 4 precisions and 16 images, 2 and 8 now), precision 60, profile 40 (17 s),
    # batch-sweep 60. The budget (480 s) ends the pass before the last ones in most runs: they were measured once.
    return [
        Step("preflight", 45, [py, str(BENCH / "gpu_preflight.py"), "--out", f"{o}/preflight.json"]
             + (["--device", "cpu"] if a.dry_run else []), ["preflight.json"], kernels_switch=False),
        Step("latency", 120, [py, bl, *lat, "--methods", "unioncam,scorecam,reference,pytorch-grad-cam,torchcam",
                              "--precision", ours, "--peer-precision", "fp32,tf32", "--out", f"{o}/latency.json"],
             ["latency.json"]),
        # The two steps that decide the next defaults (the fast path's switches, the GPU serving settings)
        # come right after the headline latency, before the figures that were measured once already.
        # Each variant in a process of its own (a crash or a hang loses its row only); the deciding ones first.
        Step("ab", AB_BUDGET_S + 10, [py, str(BENCH / "gpu_ab.py"), *ab, "--out", f"{o}/ab.json"], ["ab.json"]),
        # The TorchServe handler in-process on this device (benchmarks/gpu_serving.py: no Java needed); its
        # handler tests' subprocess gets what is left of the step's limit after the load (UNIONCAM_STEP_LIMIT_S).
        Step("serving", 90, [py, str(BENCH / "gpu_serving.py"), "--out", f"{o}/serving.json"]
             + (["--dry-run"] if a.dry_run else []), ["serving.json"]),
        # The kernel tests before throughput: they took 48 s on the H200 and were cut off on the H100.
        Step("kernel-tests", 90, [py, "-m", "pytest", "-v", "-rA", "--tb=short", "-p", "no:cacheprovider",
                                   f"--junitxml={o}/kernel-tests.xml", *deselect, *tests], ["kernel-tests.xml"],
             env=test_env, kernels_switch=False),
        Step("throughput", 60, [py, bl, *model, *tp, "--warmup", "1", "--methods", "unioncam",
                                "--precision", tp_precisions, "--out", f"{o}/throughput.json"], ["throughput.json"]),
        Step("precision", 60, [py, bp, *prec, "--method", "unioncam,scorecam", "--precision", "bf16,fp16",
                               "--out", f"{o}/precision-{{method}}.json"],
             ["precision-unioncam.json", "precision-scorecam.json"]),
        Step("profile", 40, [py, str(BENCH / "profile_explain.py"), *prof, "--precision", "bf16",
                             "--out-json", f"{o}/profile.json", "--out-txt", f"{o}/profile.txt"],
             ["profile.json", "profile.txt"]),
        # Two warm-up calls: both sample photos, whose last chunks differ, are autotuned before timing.
        # 60 s (was 150), bf16 only on the GPU: the A/B step has the time; all-bs128 there covers 128.
        Step("batch-sweep", 60, [py, bl, *model, *sweep, "--warmup", "1" if a.dry_run else "2", "--sequential",
                                 "--methods", "unioncam",
                                 "--precision", sweep_prec, "--out", f"{o}/batch-sweep.json"], ["batch-sweep.json"]),
    ]


class Log:
    """Prints and appends to ``gpu_check.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        with self.path.open("a") as f:
            f.write(msg + "\n")


def install_wheels(wheel_dir: Path, site: Path, python: str, log: Log) -> dict:
    """Installs the wheels in ``wheel_dir`` whose distribution the machine lacks into ``site``.

    ``pip install --no-index --no-deps --target``; where pip is missing or fails, the wheels are unzipped
    (they are pure Python). A distribution already installed is left alone (no shadowing).
    """
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    rec: dict = {"wheel_dir": str(wheel_dir), "found": [w.name for w in wheels], "installed": [], "present": []}
    todo = []
    for w in wheels:
        dist = w.name.split("-")[0]
        try:
            rec["present"].append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            todo.append(w)
    if not todo:
        log(f"wheels: nothing to install ({len(wheels)} found in {wheel_dir})")
        return rec
    site.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
           "--no-warn-script-location", "--target", str(site), *map(str, todo)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        ok = p.returncode == 0
        rec["pip"] = (p.stdout + p.stderr)[-2000:]
    except (OSError, subprocess.SubprocessError) as e:
        ok, rec["pip"] = False, f"{type(e).__name__}: {e}"
    if ok:
        rec["method"] = "pip --no-index --no-deps --target"
    else:
        rec["method"] = "unzip (pip failed or is missing)"
        for w in todo:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
    rec["installed"] = [w.name for w in todo]
    log(f"wheels: {rec['method']}: {', '.join(rec['installed'])} -> {site}")
    return rec


def run_step(step: Step, limit: int, env: dict[str, str], out: Path, log: Log) -> dict:
    """Runs one step under ``limit`` seconds (its whole process group is killed after), output to its log."""
    logfile = out / f"{step.name}.log"
    t0 = time.monotonic()
    with logfile.open("w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            rc = None
            status = f"timeout after {limit} s"
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = time.monotonic() - t0
    missing = [o for o in step.outputs if not (out / o).is_file()]
    rec = {"step": step.name, "status": status, "exit": rc, "seconds": round(seconds, 1), "limit_s": limit,
           "log": logfile.name, "outputs": step.outputs, "missing_outputs": missing}
    log(f"### {step.name}: {status} in {seconds:.1f} s" + (f"; missing {missing}" if missing else ""))
    if status != "ok":
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        log("\n".join("    " + ln for ln in tail))
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-out"),
                    help="folder for every file (default: $OUT, else gpu-out/)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no step starts (default 480; dry run 360)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU, small")
    ap.add_argument("--model", default=None, help="vgg16 / shapes (default: vgg16; dry run: shapes)")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of wheels to install (default .whl/)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    ap.add_argument("--pack", action="store_true",
                    help="at the end, pack every file but summary.md, gpu_check.log and steps.json into "
                    "results.tar.gz (4 files in all, for a transfer that takes few files)")
    ap.add_argument("--only", default=None, help="comma list of steps to run (default: all)")
    a = ap.parse_args(argv)
    budget = a.budget if a.budget is not None else (360.0 if a.dry_run else 480.0)
    start = time.monotonic()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    scratch = Path(tempfile.mkdtemp(prefix="unioncam-gpu-check-"))
    log(f"gpu_check {'dry run (CPU)' if a.dry_run else '(GPU)'}: out {out}, budget {budget:.0f} s, "
        f"python {a.python}, started {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}")

    site = scratch / "site"
    wheels = install_wheels(Path(a.wheels), site, a.python, log)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(TRITON_INTERPRET="1" if a.dry_run else "0", TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
               MPLCONFIGDIR=str(scratch / "mpl"), PYTHONDONTWRITEBYTECODE="1")
    if a.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")

    steps = _steps(a, out)
    only = {s.strip() for s in a.only.split(",")} if a.only else None
    record: dict = {"dry_run": a.dry_run, "budget_s": budget, "out": str(out), "wheels": wheels, "steps": [],
                    "unioncam_triton": None}
    switch_off = False
    for step in steps:
        if only is not None and step.name not in only:
            continue
        left = budget - (time.monotonic() - start) - RESERVE_S
        limit = int(min(step.limit_s, left))
        if limit < MIN_STEP_S:
            log(f"### {step.name}: SKIPPED, budget spent ({left:.0f} s left)")
            record["steps"].append({"step": step.name, "status": "skipped: budget spent", "seconds": 0,
                                    "outputs": step.outputs, "missing_outputs": step.outputs})
            _write(out / "steps.json", record)
            continue
        step_env = {**env, **step.env, STEP_LIMIT_ENV: str(limit)}
        if switch_off and step.kernels_switch:
            step_env["UNIONCAM_TRITON"] = "0"
        log(f"### {step.name}: start at {time.monotonic() - start:.0f} s, limit {limit} s")
        rec = run_step(step, limit, step_env, out, log)
        rec["unioncam_triton"] = step_env.get("UNIONCAM_TRITON")
        record["steps"].append(rec)
        if step.name == "preflight":
            ok = _read(out / "preflight.json").get("kernels_ok")
            if ok is False or rec["status"] != "ok":
                switch_off = True
                record["unioncam_triton"] = ("0: the pre-flight found a kernel failing or disagreeing with its twin"
                                             if ok is False else f"0: the pre-flight did not finish ({rec['status']})")
                log(f"UNIONCAM_TRITON=0 for the rest of the pass ({record['unioncam_triton']})")
            else:
                record["unioncam_triton"] = "unset: kernels ran and matched their twins" if ok else \
                    "unset: kernels not checked on this device"
        _write(out / "steps.json", record)
    record["seconds"] = round(time.monotonic() - start, 1)
    _write(out / "steps.json", record)
    try:
        import gpu_summary  # noqa: PLC0415 - beside this file
    except ImportError:
        sys.path.insert(0, str(BENCH))
        import gpu_summary  # noqa: PLC0415
    try:
        text = gpu_summary.write_summary(out)
        log(text)
    except Exception as e:  # noqa: BLE001 - the figures are in the JSONs even if the summary breaks
        log(f"summary FAILED: {type(e).__name__}: {e}")
        (out / "summary.md").write_text(f"# GPU check\n\nThe summary could not be written: {e}\n")
    shutil.rmtree(scratch, ignore_errors=True)
    if a.pack:
        pack(out, log)
    log(f"done in {time.monotonic() - start:.0f} s; files in {out}")
    bad = [s for s in record["steps"] if s["status"] != "ok"]
    return 1 if bad else 0


KEEP = ("summary.md", "gpu_check.log", "steps.json")


def pack(out: Path, log: Log) -> Path:
    """Moves every file of ``out`` but :data:`KEEP` into ``out/results.tar.gz``."""
    import tarfile

    archive = out / "results.tar.gz"
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name not in KEEP and p != archive)
    with tarfile.open(archive, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=p.name)
    for p in files:
        p.unlink()
    log(f"packed {len(files)} files into {archive.name}")
    return archive


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
