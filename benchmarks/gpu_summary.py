"""``summary.md`` of a GPU pass (``benchmarks/gpu_check.py``): every figure from the pass's own files.

    python benchmarks/gpu_summary.py gpu-out       # rewrite gpu-out/summary.md from the JSONs there

Nothing here measures: a figure missing from the files is written as "not measured" with the step's status.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: The GPU goals (H100 or H200, VGG16 224², random weights): per image at the default GPU precision, in
#: throughput mode, peak allocated at the defaults (graph pool included), and the speed-up over
#: pytorch-grad-cam's ScoreCAM at its default (TF32) settings.
TARGETS = {"latency_s": 0.040, "throughput_s": 0.026, "peak_gb": 1.1, "speedup_vs_pytorch_grad_cam": 5.0}
SWEEP_CAP_GB = 1.1


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1e3:.1f}"


def _gb(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _status(steps: dict, name: str) -> str:
    s = steps.get(name)
    return "not run" if s is None else s["status"]


def kernel_tests(path: Path) -> dict:
    """Counts and failing tests from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        out["time_s"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                out["failed"].append(f"{case.get('classname')}::{case.get('name')}: "
                                     f"{(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}")
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def kernel_tests_from_log(path: Path) -> dict:
    """Outcomes so far from pytest's ``-v`` lines in the step's log: what a cut-off run (no JUnit XML, which
    pytest writes at the end) still tells."""
    outcomes: dict[str, int] = {}
    failed: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        m = _VERBOSE.match(line.strip())
        if m:
            outcomes[m.group(2)] = outcomes.get(m.group(2), 0) + 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(f"{m.group(2)} {m.group(1)}")
    return {"outcomes": outcomes, "failed": failed}


def _latency_table(res: dict, per: str) -> list[str]:
    rows = res.get("rows", [])
    cuda = res.get("device_type") == "cuda"
    peer = next((r for r in rows if r["entry"] == "pytorch-grad-cam-fp32" and "median_s" in r), None)
    lines = [f"| entry | median ms/{per} (p10–p90) | × vs pytorch-grad-cam fp32 | "
             + ("peak allocated GB | peak reserved GB | working set GB | " if cuda else "peak RSS GB | ")
             + "network forwards/img | timed calls with a new shape |",
             "|---|---|---|" + ("---|---|---|" if cuda else "---|") + "---|---|"]
    for r in rows:
        if "median_s" not in r:
            why = r.get("skipped") or r.get("error") or "no timed call"
            lines.append(f"| {r['entry']} | not measured: {why[:160]} |")
            continue
        ratio = f"{peer['median_s'] / r['median_s']:.2f}" if peer else "—"
        mem = (f"{_gb(r.get('max_memory_allocated_gb'))} | {_gb(r.get('max_memory_reserved_gb'))} | "
               f"{_gb(r.get('working_set_gb'))} | " if cuda else f"{_gb(r.get('peak_rss_gb'))} | ")
        new = r.get("timed_calls_with_new_shapes")
        lines.append(f"| {r['entry']} | {_ms(r['median_s'])} ({_ms(r['p10_s'])}–{_ms(r['p90_s'])}) | {ratio} | {mem}"
                     f"{r.get('network_forwards_per_image', 0):.0f} | {new}/{r.get('timed_calls')} |"
                     + (f" error: {r['error'][:120]}" if "error" in r else ""))
    return lines


def _median(rows: list[dict], entry: str) -> float | None:
    r = next((r for r in rows if r["entry"] == entry and "median_s" in r), None)
    return None if r is None else r["median_s"]


def ab_table(rows: list[dict], device_type: str) -> list[str]:
    """The fast path's A/B table (``benchmarks/gpu_ab.py``'s rows), in Markdown, and the variant the chunk
    rule picks (:func:`ab_pick`). The columns are explained in ``docs/fast-path.md``."""
    cuda = device_type == "cuda"
    today = next((r for r in rows if r["variant"] == "today" and "median_s" in r), None)
    per = "chunk" if rows and rows[0].get("unit") == "chunk" else "img"
    diff = "max abs score diff" if per == "chunk" else "max abs map diff"
    lines = [f"| variant | chunk | median ms/{per} (p10–p90) | × today | "
             + ("peak allocated GB | graph pool GB | peak + pool GB | peak reserved GB | working set GB | " if cuda
                else "peak RSS GB | graph pool GB | ")
             + f"compile s | capture s | {diff} | `selected` agrees |",
             "|---|---|---|---|" + ("---|---|---|---|---|" if cuda else "---|---|") + "---|---|---|---|"]
    for r in rows:
        if "median_s" not in r:
            why = (r.get("error") or r.get("skipped")
                   or (f"cut off while running ({r['running']})" if r.get("running") else "not measured"))
            lines.append(f"| {r['variant']} | {r.get('batch_size') or '—'} | not measured: {why[:200]} |")
            continue
        ratio = f"{today['median_s'] / r['median_s']:.2f}" if today else "—"
        pool = r.get("graph_pool_gb")
        pool_s = "—" if not pool else f"{pool:.2f}"
        # Reserved too: a CUDA graph's private pool keeps its activations' memory reserved between replays.
        mem = (f"{r.get('max_memory_allocated_gb', 0):.2f} | {pool_s} | {_peak_gb(r):.2f} | "
               f"{r.get('max_memory_reserved_gb', 0):.2f} | {r.get('working_set_gb', 0):.2f} | " if cuda
               else f"{r.get('peak_rss_gb', 0):.2f} | {pool_s} | ")
        d = r.get("max_abs_map_diff", r.get("max_abs_score_diff"))
        note = f" ({r['note']})" if r.get("note") else ""
        fails = [w for w, k in (("compile failed, ran eager", "compile_failed"),
                                ("capture failed, ran without graphs", "graphs_failed")) if r.get(k)]
        lines.append(f"| {r['variant']}{note} | {r['batch_size']} | {r['median_s'] * 1e3:.1f} "
                     f"({r['p10_s'] * 1e3:.1f}–{r['p90_s'] * 1e3:.1f}) | {ratio} | {mem}"
                     f"{r.get('compile_s', 0):.1f} | {r.get('capture_s', 0):.2f} | "
                     f"{'—' if d is None else f'{d:.2e}'} | {r.get('selected_agree', '—')} |"
                     + (f" {'; '.join(fails)}" if fails else ""))
    if cuda and per == "img":
        pick = ab_pick(rows)
        lines.append("")
        lines.append(f"Chunk rule (fastest variant whose `selected` all agree with today's, with peak allocated, "
                     f"graph pool included, ≤ {SWEEP_CAP_GB} GB): "
                     + (f"**{pick['variant']}** at {pick['batch_size']} ({pick['median_s'] * 1e3:.1f} ms/img, "
                        f"{_peak_gb(pick):.2f} GB)" if pick else "none qualifies"))
    return lines


def _peak_gb(r: dict) -> float:
    """Peak allocated with the CUDA graphs' private pool (reserved, not allocated, between replays) added."""
    if r.get("peak_gb") is not None:
        return float(r["peak_gb"])
    return float(r.get("max_memory_allocated_gb", 0.0) or 0.0) + float(r.get("graph_pool_gb", 0.0) or 0.0)


def ab_pick(rows: list[dict], cap_gb: float = SWEEP_CAP_GB) -> dict | None:
    """The A/B row the chunk rule picks: the fastest measured variant whose every ``selected`` agrees with
    today's (today's own row qualifies), no switch failing, with peak allocated + graph pool ≤ ``cap_gb``."""
    ok = []
    for r in rows:
        if "median_s" not in r or r.get("compile_failed") or r.get("graphs_failed"):
            continue
        agree = r.get("selected_agree")
        if r["variant"] != "today" and (not agree or agree.split("/")[0] != agree.split("/")[1]):
            continue
        if _peak_gb(r) <= cap_gb:
            ok.append(r)
    return min(ok, key=lambda r: r["median_s"]) if ok else None


def write_summary(out: Path) -> str:
    """Writes ``out/summary.md`` and returns its text."""
    out = Path(out)
    steps_rec = _read(out / "steps.json")
    steps = {s["step"]: s for s in steps_rec.get("steps", [])}
    pre = _read(out / "preflight.json")
    env = pre.get("environment", {})
    lat, tp, sweep = _read(out / "latency.json"), _read(out / "throughput.json"), _read(out / "batch-sweep.json")
    prof = _read(out / "profile.json")
    any_res = lat or tp or sweep or prof
    versions = env.get("versions") or any_res.get("versions", {})
    device = env.get("device") or any_res.get("device", "unknown")
    settings = lat.get("settings", {})
    L: list[str] = []
    dry = steps_rec.get("dry_run")
    L.append(f"# GPU check: {device}" + (" (DRY RUN on CPU: no GPU figure here)" if dry else ""))
    L.append("")
    L.append(f"- device: {device}" + (f", compute capability {'.'.join(map(str, env['capability']))}, "
                                      f"{env['memory_gb']:.0f} GiB, {env.get('multiprocessors')} SMs"
                                      if env.get("capability") else ""))
    L.append(f"- driver: {env.get('driver') or '—'}; CUDA (torch) {versions.get('cuda', '—')}, "
             f"cuDNN {versions.get('cudnn', '—')}")
    L.append(f"- python {versions.get('python', '—')}, torch {versions.get('torch', '—')}, torchvision "
             f"{versions.get('torchvision', '—')}, triton {versions.get('triton', '—')}, numpy "
             f"{versions.get('numpy', '—')}, grad-cam {versions.get('grad-cam', '—')}, torchcam "
             f"{versions.get('torchcam', '—')}")
    L.append(f"- commit: {env.get('commit') or any_res.get('commit', 'unknown')}")
    L.append(f"- kernels: {steps_rec.get('unioncam_triton') or '—'}")
    L.append(f"- whole pass: {steps_rec.get('seconds', '—')} s (budget {steps_rec.get('budget_s', '—')} s)")
    L.append("")
    L.append("| step | status | seconds |")
    L.append("|---|---|---|")
    for s in steps_rec.get("steps", []):
        L.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '—')} |")

    # Pre-flight: the kernels against their twins.
    L += ["", "## Kernels against their torch twins (pre-flight)", ""]
    k = pre.get("kernels", {})
    if k.get("ops"):
        L.append(f"{k.get('path')}; shapes {k.get('shapes')}")
        L.append("")
        L.append("| op | agrees | max abs diff | kernel ms | twin ms | first call s (compile) |")
        L.append("|---|---|---|---|---|---|")
        for op, r in k["ops"].items():
            agree = "yes" if r.get("ok") else f"NO: {r.get('error', 'outside tolerance')[:150]}"
            d = r.get("max_abs_diff")
            L.append(f"| {op} | {agree} | {'—' if d is None else f'{d:.2e}'} | {_ms(r.get('kernel_s'))} | "
                     f"{_ms(r.get('twin_s'))} | {r.get('first_call_s', 0):.2f} |")
    else:
        L.append(f"not measured ({_status(steps, 'preflight')}; {k.get('error', '')})")

    # Latency.
    L += ["", "## Latency per image", ""]
    if lat.get("rows"):
        model = settings.get("model", "vgg16")
        L.append(f"{model}" + (f" ({settings.get('weights')} weights)" if model == "vgg16" else " (trained)") + ", "
                 f"{settings.get('size')}², {settings.get('images_timed')} timed images per entry "
                 f"(reference: {settings.get('reference_images') or settings.get('images_timed')}), "
                 f"{settings.get('warmup')} warm-up calls, masked inputs per forward {settings.get('batch_size')}; "
                 "fp32 = strict float32 (TF32 off) for every entry, tf32 = TF32 convolutions and matmuls."
                 + ("" if lat.get("complete") else " INCOMPLETE: the step did not finish; rows so far."))
        L.append("")
        L += _latency_table(lat, "img")
        w = lat.get("model_bytes", {})
        if w:
            L.append("")
            L.append(f"Weights: {(w['params'] + w['buffers']) / 2**30:.3f} GB float32 (always resident); the "
                     f"bf16/fp16 copy our scorer makes for a half-precision call: {w['half_copy'] / 2**30:.3f} GB. "
                     "Working set = peak allocated − resident before the call − that copy (memory measured on "
                     "one untimed call per entry after `empty_cache()`).")
    else:
        L.append(f"not measured ({_status(steps, 'latency')})")

    L += ["", "## Throughput mode (several images per call)", ""]
    if tp.get("rows"):
        ts = tp.get("settings", {})
        L.append(f"{ts.get('throughput')} images per `explain_batch` call, {ts.get('images_timed')} images, "
                 "every call the same shape." + ("" if tp.get("complete") else " INCOMPLETE."))
        L.append("")
        L += _latency_table(tp, "img")
    else:
        L.append(f"not measured ({_status(steps, 'throughput')})")

    L += ["", "## Masked inputs per forward (batch_size) sweep", ""]
    if sweep.get("rows"):
        cuda = sweep.get("device_type") == "cuda"
        key = "max_memory_allocated_gb" if cuda else "peak_rss_gb"
        L.append("| precision | batch_size | median ms/img (p10–p90) | peak allocated GB | peak reserved GB |"
                 if cuda else "| precision | batch_size | median ms/img (p10–p90) | peak RSS GB | |")
        L.append("|---|---|---|---|---|")
        by_prec: dict[str, list[tuple[int, dict]]] = {}
        for r in sweep["rows"]:
            parts = r["entry"].split("-")
            bs = int(parts[-1][2:]) if parts[-1].startswith("bs") else (sweep.get("settings", {}).get(
                "batch_size") or [0])[0]
            by_prec.setdefault(parts[1], []).append((bs, r))
        for prec, items in by_prec.items():
            for bs, r in sorted(items, key=lambda t: t[0]):
                if "median_s" not in r:
                    L.append(f"| {prec} | {bs} | not measured: {r.get('error', '')[:120]} | | |")
                    continue
                L.append(f"| {prec} | {bs} | {_ms(r['median_s'])} ({_ms(r['p10_s'])}–{_ms(r['p90_s'])}) | "
                         f"{_gb(r.get(key))} | {_gb(r.get('max_memory_reserved_gb')) if cuda else ''} |")
        if cuda:
            L.append("")
            for prec, items in by_prec.items():
                ok = [(bs, r) for bs, r in items if "median_s" in r]
                fit = [(bs, r) for bs, r in ok if r.get("max_memory_allocated_gb", 1e9) <= SWEEP_CAP_GB]
                fastest = min(ok, key=lambda t: t[1]["median_s"]) if ok else None
                best_fit = max(fit, key=lambda t: t[0]) if fit else None
                L.append(f"- {prec}: largest batch_size with peak allocated ≤ {SWEEP_CAP_GB} GB: "
                         + (f"{best_fit[0]} ({_ms(best_fit[1]['median_s'])} ms/img)" if best_fit else "none")
                         + "; fastest: " + (f"{fastest[0]} ({_ms(fastest[1]['median_s'])} ms/img, "
                                            f"{_gb(fastest[1].get('max_memory_allocated_gb'))} GB)" if fastest
                                            else "—"))
    else:
        L.append(f"not measured ({_status(steps, 'batch-sweep')})")

    # The fast path's A/B.
    L += ["", "## Fast path A/B (same images, a process per variant)", ""]
    ab = _read(out / "ab.json")
    if ab.get("rows"):
        st = ab.get("settings", {})
        L.append(f"{st.get('model')}, {st.get('size')}², UnionCAM {st.get('precision')}, {st.get('images')} timed images "
                 f"and {st.get('warmup')} warm-up calls per variant after `unioncam.prepare`; compile backend "
                 f"{ab.get('compile_backend')}; map difference and `selected` against the `today` variant."
                 + ("" if ab.get("complete") else " INCOMPLETE: the step did not finish; rows so far."))
        L.append("")
        L += ab_table(ab["rows"], ab.get("device_type", ""))
        w = ab.get("model_bytes", {})
        if w and ab.get("device_type") == "cuda":
            L.append("")
            L.append(f"Weights {(w['params'] + w['buffers']) / 2**30:.3f} GB float32, half copy "
                     f"{w['half_copy'] / 2**30:.3f} GB: per call on today's path (inside the peak), held with the "
                     "model on the fast path (inside what was resident); working set = peak − resident − a per-call copy.")
        missing = [v for v in st.get("variants", []) if v not in {r["variant"] for r in ab["rows"]}]
        if missing:
            L.append("")
            L.append(f"Not reached (the step's time limit): {', '.join(missing)}")
        if ab.get("processes"):
            L.append("")
            L.append(f"Variants: {ab['processes']}.")
    else:
        L.append(f"not measured ({_status(steps, 'ab')})")

    # Precision agreement.
    L += ["", "## bf16 / fp16 against strict fp32", ""]
    any_prec = False
    for method in ("unioncam", "scorecam"):
        p = _read(out / f"precision-{method}.json")
        if not p.get("summary"):
            L.append(f"- {method}: not measured ({_status(steps, 'precision')})")
            continue
        if not any_prec:
            L.append("| method | precision | images | Pearson median / min | Pearson ≥ 0.999 | max abs diff | "
                     "`selected` agrees |")
            L.append("|---|---|---|---|---|---|---|")
            any_prec = True
        for prec, s in p["summary"].items():
            pm = "—" if s.get("pearson_median") is None else f"{s['pearson_median']:.5f} / {s['pearson_min']:.4f}"
            agree = (f"{s['selected_agree']}/{s['images']}" if "selected_agree" in s else "—")
            d = s.get("max_abs_diff")
            L.append(f"| {method} | {prec} | {s['images']} | {pm} | {s['pearson_ge_0999']}/{s['pearson_defined']} | "
                     f"{'—' if d is None else f'{d:.2e}'} | {agree} |")

    # Profile.
    L += ["", "## Profile of one UnionCAM bf16 explanation", ""]
    pr = prof.get("profile")
    if pr:
        L.append(f"wall {_ms(pr['wall_s'])} ms under the profiler (fastest unprofiled warm-up: {_ms(prof.get('unprofiled_median_s'))} ms); "
                 f"{pr['source']}, {pr['events']} events")
        shares = pr.get("share_of_wall") or pr.get("share_of_events") or {}
        what = "of wall time" if "share_of_wall" in pr else "of operator self time"
        L.append("")
        L.append(f"Shares {what}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items() if v is not None))
        L.append("")
        L.append("| ms | calls | category | name |")
        L.append("|---|---|---|---|")
        for r in pr["top"][:12]:
            L.append(f"| {r['s'] * 1e3:.2f} | {r['calls']} | {r['category']} | `{r['name'][:100]}` |")
    else:
        L.append(f"not measured ({_status(steps, 'profile')})")

    # Kernel tests.
    L += ["", "## Kernel tests on this device", ""]
    kt = kernel_tests(out / "kernel-tests.xml")
    if kt:
        L.append(f"{kt['passed']} passed, {kt['failures']} failed, {kt['errors']} errors, {kt['skipped']} skipped "
                 f"in {kt['time_s']:.0f} s (`kernel-tests.log`)")
        for f in kt["failed"][:20]:
            L.append(f"- FAILED {f}")
    else:
        L.append(f"not run to the end ({_status(steps, 'kernel-tests')}; see `kernel-tests.log`)")
        so_far = kernel_tests_from_log(out / "kernel-tests.log")
        if so_far["outcomes"]:
            L.append("")
            L.append("Before the cut (pytest's `-v` lines): " + ", ".join(
                f"{n} {k.lower()}" for k, n in sorted(so_far["outcomes"].items())))
            for f in so_far["failed"][:20]:
                L.append(f"- {f}")

    # The serving step (its own script renders its table).
    if "serving" in steps or (out / "serving.json").is_file():
        try:
            import gpu_serving  # noqa: PLC0415 - beside this file
        except ImportError:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import gpu_serving  # noqa: PLC0415
        L += gpu_serving.summary_lines(out)

    # Against the targets.
    if lat.get("rows") and lat.get("device_type") == "cuda":
        rows = lat["rows"]
        L += ["", f"## Against the GPU goals (measured on {device})", ""]
        peer = _median(rows, "pytorch-grad-cam-tf32")  # its default settings on this GPU
        strict_peer = _median(rows, "pytorch-grad-cam-fp32")
        for prec in ("bf16", "fp16", "tf32", "fp32"):
            m = _median(rows, f"unioncam-{prec}")
            r = next((r for r in rows if r["entry"] == f"unioncam-{prec}"), {})
            tpm = _median(tp.get("rows", []), f"unioncam-{prec}")
            if m is None:
                continue
            L.append(f"- unioncam {prec}: {_ms(m)} ms/img (target ≤ {_ms(TARGETS['latency_s'])}); throughput "
                     f"{_ms(tpm)} ms/img (target ≤ {_ms(TARGETS['throughput_s'])}); peak allocated "
                     f"{_gb(r.get('max_memory_allocated_gb'))} GB today's path (target ≤ {TARGETS['peak_gb']} at the "
                     "defaults, graph pool included: the A/B's peak + pool column for the switches); × pytorch-grad-cam "
                     f"tf32 {'—' if peer is None else f'{peer / m:.2f}'} (target ≥ {TARGETS['speedup_vs_pytorch_grad_cam']}), "
                     f"× its strict fp32 {'—' if strict_peer is None else f'{strict_peer / m:.2f}'}")
    text = "\n".join(L) + "\n"
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    print(write_summary(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-out")))
