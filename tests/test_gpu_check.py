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
# The deciding rows first: a step cut off by its limit keeps them.
AB_VARIANTS = ["today", "graphs", "all", "compile", "fixed", "pool-first", "all-bs128"]


@pytest.mark.slow
def test_dry_run_writes_every_file(tmp_path):
    out = tmp_path / "gpu-out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "UNIONCAM_TRITON")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--budget", "600", "--wheels", str(tmp_path / "no-wheels")],
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
    assert serving["ok"] is True and list(serving["parts"]) == ["traps", "load", "handler-tests"], serving
    # The handler tests' subprocess fits inside the step's own limit, after the load.
    assert 0 < serving["parts"]["handler-tests"]["timeout_s"] < steps["serving"]["limit_s"]
    assert serving["parts"]["traps"]["oom"]["first"]["status"] == 507
    modes = serving["parts"]["load"]["modes"]
    assert modes["shared"]["shared_with"] > 1 and modes["alone"]["shared_with"] == 1
    assert modes["shared"]["explain"]["statuses"] == [200] and modes["shared"]["selected_agree"] == "4/4"

    ab = data["ab.json"]
    assert ab["complete"] is True and ab["dry_run"] is True and ab["compile_backend"] == "eager"
    ab_rows = {r["variant"]: r for r in ab["rows"]}
    assert list(ab_rows) == AB_VARIANTS
    assert ab["processes"].startswith("one process per variant")
    for name, r in ab_rows.items():  # every variant measured, in a process of its own; the exact ones give today's maps
        assert "error" not in r and r["median_s"] > 0, (name, r.get("error"), r.get("log_tail"))
        assert r["process_s"] > 0 and r["graph_pool_gb"] == 0 and r["compile_s"] >= 0 and r["capture_s"] >= 0
        assert r["caches_cold"] is True, r["caches"]  # every compile a cold start, as a new server's
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert len({r["caches"][var] for r in ab_rows.values()}) == len(ab_rows)  # a cache of its own each
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
                    "| all-bs128", "graph pool GB | compile s | capture s"):
        assert heading in summary, heading


def _bench(name: str):
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_ab_variants_run_in_the_deciding_order_and_the_step_has_its_time():
    gpu_ab, gpu_check = _bench("gpu_ab"), _bench("gpu_check")
    assert list(gpu_ab.VARIANTS) == AB_VARIANTS
    import argparse

    for dry in (False, True):
        a = argparse.Namespace(python=sys.executable, dry_run=dry, model=None)
        steps = {s.name: s for s in gpu_check._steps(a, Path("/tmp/out"))}
        ab = steps["ab"]
        budget = float(ab.argv[ab.argv.index("--budget") + 1])
        assert budget >= 180 and ab.limit_s > budget  # about 200 s, the table written inside the limit
        if not dry:  # the pass's own budget (480 s) holds preflight, latency and the whole A/B
            assert steps["preflight"].limit_s + steps["latency"].limit_s + ab.limit_s <= 480 - 5


def test_the_handler_tests_fit_inside_the_serving_step():
    gpu_serving = _bench("gpu_serving")
    assert gpu_serving.tests_timeout(150, budget=85, elapsed=30) <= 85 - 30
    assert gpu_serving.tests_timeout(60, budget=None, elapsed=30) == 60
    assert gpu_serving.tests_timeout(60, budget=40, elapsed=38) < gpu_serving.MIN_TESTS_S  # then skipped


def test_the_chunk_rule_counts_the_graph_pool():
    ab_pick = _bench("gpu_summary").ab_pick
    rows = [
        {"variant": "today", "batch_size": 64, "median_s": 0.080, "max_memory_allocated_gb": 1.05},
        # Fastest, but its graph pool (reserved between replays, not allocated) takes it over 1.1 GB.
        {"variant": "graphs", "batch_size": 64, "median_s": 0.050, "max_memory_allocated_gb": 0.95,
         "graph_pool_gb": 0.30, "selected_agree": "6/6"},
        {"variant": "fixed", "batch_size": 64, "median_s": 0.070, "max_memory_allocated_gb": 1.00,
         "graph_pool_gb": 0.0, "selected_agree": "6/6"},
        {"variant": "pool-first", "batch_size": 64, "median_s": 0.060, "max_memory_allocated_gb": 0.90,
         "selected_agree": "5/6"},  # faster, but one selected map differs from today's
        {"variant": "all", "batch_size": 64, "error": "timeout after 80 s"},
    ]
    for r in rows:
        if "median_s" in r:
            r.update(p10_s=r["median_s"], p90_s=r["median_s"])
    assert ab_pick(rows)["variant"] == "fixed"
    rows[1]["graph_pool_gb"] = 0.10
    assert ab_pick(rows)["variant"] == "graphs"
    table = "\n".join(_bench("gpu_summary").ab_table(rows, "cuda"))
    assert "graph pool GB | peak + pool GB" in table and "| 0.95 | 0.10 | 1.05 |" in table
    assert "Chunk rule" in table and "**graphs** at 64" in table and "not measured: timeout after 80 s" in table


@pytest.mark.slow
def test_a_variant_that_crashes_or_hangs_loses_its_row_only(tmp_path):
    out = tmp_path / "ab.json"
    env = {k: v for k, v in os.environ.items() if k not in ("UNIONCAM_STEP_LIMIT_S", "UNIONCAM_TRITON")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ab.py"), "--dry-run", "--threads", "2",
                           "--variants", "graphs,all,fixed", "--images", "1", "--warmup", "0",
                           "--inject-failure", "graphs:abort,all:hang", "--variant-limit", "35", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert res["complete"] is True and list(rows) == ["graphs", "all", "fixed"]
    # An abort (as a CUDA assert would) and a hang each cost their own row, with what they measured first.
    assert rows["graphs"]["error"].startswith("crashed (signal 6)") and "prepare_s" in rows["graphs"]
    assert rows["all"]["error"].startswith("timeout after 35 s") and "prepare_s" in rows["all"]
    assert "median_s" not in rows["graphs"] and "median_s" not in rows["all"]
    # The row after them is measured, in a clean process (the dry run compares every row with today's maps).
    assert rows["fixed"]["median_s"] > 0 and "error" not in rows["fixed"]
    assert "injected failure: abort" in rows["graphs"]["error"] and rows["graphs"]["log_tail"]


def test_a_cut_off_kernel_test_run_still_reports_what_ran(tmp_path):
    # pytest writes its JUnit XML at the end only: the summary reads the -v lines of the step's log.
    (tmp_path / "kernel-tests.log").write_text(
        "$ python -m pytest -v\n"
        "tests/test_kernels.py::test_denoise[cuda-0] PASSED                   [  1%]\n"
        "tests/test_kernels.py::test_denoise[cuda-1] FAILED                   [  2%]\n"
        "tests/test_kernels.py::test_range[cuda] SKIPPED (no sm_90 build)     [  3%]\n")
    (tmp_path / "steps.json").write_text(json.dumps({"steps": [
        {"step": "kernel-tests", "status": "timeout after 90 s", "seconds": 90}]}))
    summary = _bench("gpu_summary").write_summary(tmp_path)
    assert "not run to the end (timeout after 90 s" in summary
    assert "1 failed, 1 passed, 1 skipped" in summary and "- FAILED tests/test_kernels.py::test_denoise[cuda-1]" in summary
