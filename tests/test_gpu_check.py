"""The GPU pass (benchmarks/gpu_check.py) in its CPU dry run: every step runs and every file it promises parses.

The pass is run for real only where a GPU is lent, rarely; this keeps its code paths from rotting in between.
Libraries that are not installed (pytorch-grad-cam, torchcam) must show up as skipped rows, not failures.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

JSONS = ["steps.json", "preflight.json", "latency.json", "throughput.json", "batch-sweep.json",
         "precision-unioncam.json", "precision-scorecam.json", "profile.json", "serving.json", "ab.json"]
STEPS = ["preflight", "latency", "ab", "serving", "kernel-tests", "throughput", "precision", "profile", "batch-sweep"]
AB_VARIANTS = ["today", "fixed", "pool-first", "graphs", "compile", "all", "all-bs128"]


@pytest.mark.slow
def test_dry_run_writes_every_file(tmp_path):
    out = tmp_path / "gpu-out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "UNIONCAM_TRITON")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--budget", "400", "--wheels", str(tmp_path / "no-wheels")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log

    data = {name: json.loads((out / name).read_text()) for name in JSONS}
    steps = {s["step"]: s for s in data["steps.json"]["steps"]}
    assert list(steps) == STEPS
    assert all(s["status"] == "ok" and not s["missing_outputs"] for s in steps.values()), steps
    for name in STEPS:
        assert (out / f"{name}.log").read_text().startswith("$ ")

    assert data["preflight.json"]["kernels_ok"] is True
    assert set(data["preflight.json"]["kernels"]["ops"]) == {
        "denoise", "upsampled_range", "masked_inputs/float32", "masked_inputs/bfloat16", "masked_inputs/float16"}

    lat = data["latency.json"]
    assert lat["complete"] is True
    rows = {r["entry"]: r for r in lat["rows"]}
    for entry in ("unioncam-fp32", "unioncam-tf32", "unioncam-bf16", "scorecam-fp32", "reference-fp32"):
        assert rows[entry]["median_s"] > 0 and rows[entry]["timed_calls_with_new_shapes"] == 0, rows[entry]
    for peer in ("pytorch-grad-cam-fp32", "pytorch-grad-cam-tf32", "torchcam-fp32", "torchcam-tf32"):
        assert peer in rows and ("median_s" in rows[peer] or "skipped" in rows[peer]), rows.get(peer)

    tp = data["throughput.json"]["rows"]
    assert all(r["images_per_call"] == 2 and r["timed_calls"] >= 1 for r in tp), tp
    sweep = {r["entry"] for r in data["batch-sweep.json"]["rows"]}
    assert sweep == {f"unioncam-{p}-bs{b}" for p in ("fp32", "bf16") for b in (8, 16)}
    for name in ("precision-unioncam.json", "precision-scorecam.json"):
        assert set(data[name]["summary"]) == {"bf16", "fp16"}
    prof = data["profile.json"]["profile"]
    assert prof["top"] and set(prof["group_s"]) == {"conv_gemm", "triton", "memcpy", "other"}
    assert (out / "profile.txt").read_text().strip()

    serving = data["serving.json"]
    assert serving["ok"] is True and set(serving["parts"]) == {"traps", "handler-tests", "load"}, serving
    assert serving["parts"]["traps"]["oom"]["first"]["status"] == 507
    modes = serving["parts"]["load"]["modes"]
    assert modes["shared"]["shared_with"] > 1 and modes["alone"]["shared_with"] == 1
    assert modes["shared"]["explain"]["statuses"] == [200] and modes["shared"]["selected_agree"] == "4/4"

    ab = data["ab.json"]
    assert ab["complete"] is True and ab["dry_run"] is True and ab["compile_backend"] == "eager"
    ab_rows = {r["variant"]: r for r in ab["rows"]}
    assert list(ab_rows) == AB_VARIANTS
    for name, r in ab_rows.items():  # every variant measured; the exact ones give today's maps
        assert "error" not in r and r["median_s"] > 0, (name, r.get("error"), r.get("traceback"))
        if name != "today":
            assert r["selected_agree"] == f"{r['images']}/{r['images']}", r
    assert ab_rows["fixed"]["max_abs_map_diff"] == 0 and ab_rows["pool-first"]["max_abs_map_diff"] == 0
    assert "skipped" in ab_rows["graphs"]["note"] and ab_rows["graphs"]["resolved"]["cuda_graphs"] is False
    assert ab_rows["all-bs128"]["batch_size"] == 128 and ab_rows["compile"]["resolved"]["fixed_chunks"]

    suite = ET.parse(out / "kernel-tests.xml").getroot()
    assert int(next(suite.iter("testsuite")).get("tests")) > 0
    summary = (out / "summary.md").read_text()
    for heading in ("# GPU check", "## Kernels against their torch twins", "## Latency per image", "## Throughput mode",
                    "## Masked inputs per forward", "## bf16 / fp16 against strict fp32", "## Profile of one UnionCAM",
                    "## Kernel tests on this device", "## The handler on this device", "## Fast path A/B",
                    "| all-bs128"):
        assert heading in summary, heading
