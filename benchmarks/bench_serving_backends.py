"""p50 and p99 of one UnionCAM request through each serving backend, measured in the same run.

Both servers run at once on 127.0.0.1 with the same settings (``unioncam serve --model shapes --weights shipped``
and the same with ``--backend kserve``: the shapes CNN at 64², CPU settings, strict fp32) and get the same
request: ``POST /v1/models/unioncam:explain`` with one instance (the shipped ``samples/shapes/cross.png``,
UnionCAM). Requests are sent one at a time, the backends taking turns request by request, so a busy shared
machine slows both alike; the first ``--warmup`` of each are not timed. Every timed answer's map is checked
against the other backend's (equal to a float16 step: the same service, another thread count).

    python benchmarks/bench_serving_backends.py --requests 200

Writes ``benchmarks/results/serving-backends-cpu.json`` (or ``--out``): the CPU, versions, settings, each
backend's p50/p99/mean/stdev/min/max in milliseconds, and the raw timings.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import torch  # noqa: E402

from unioncam.serve.runs import free_port  # noqa: E402
from unioncam.serve.torchserve.server import Ports, config_text  # noqa: E402


def _cpu() -> str:
    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} threads)"


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 — the server's, closed when it ends
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "Ctrl-C stops" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[3:6]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _key(run: Path) -> str:
    return json.loads((run / "key_file.json").read_text())["inference"]["key"]


def _summary(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": statistics.median(ms), "p99_ms": q[98], "mean_ms": statistics.fmean(ms),
            "stdev_ms": statistics.stdev(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="timed requests per backend; default 200")
    ap.add_argument("--warmup", type=int, default=10, help="untimed requests per backend first; default 10")
    ap.add_argument("--work", default=None, help="folder for run folders and logs; default a new temp folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving-backends-cpu.json"))
    ap.add_argument("--note", default="", help="a sentence kept with the figures (e.g. what else ran)")
    args = ap.parse_args()

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    common = ["--model", "shapes", "--weights", "shipped", "--precision", "fp32", "--device", "cpu"]
    ports = Ports.free()
    (work / "ts.properties").write_text(config_text(ports))
    ts_cmd = [sys.executable, "-m", "unioncam", "serve", *common, "--config", str(work / "ts.properties"),
              "--runs", str(work / "runs"), "--run-name", "torchserve", "--model-store", str(work / "store")]
    ks_port = free_port()
    ks_cmd = [sys.executable, "-m", "unioncam", "serve", "--backend", "kserve", *common, "--port", str(ks_port),
              "--runs", str(work / "runs"), "--run-name", "kserve"]
    servers = {}
    load_before = os.getloadavg()
    try:
        servers["torchserve"] = _start(ts_cmd, work, env, work / "torchserve.log")
        servers["kserve"] = _start(ks_cmd, work, env, work / "kserve.log")
        urls = {"torchserve": f"http://127.0.0.1:{ports.inference}", "kserve": f"http://127.0.0.1:{ks_port}"}
        keys = {name: _key(work / "runs" / name) for name in urls}
        b64 = base64.b64encode((ROOT / "samples" / "shapes" / "cross.png").read_bytes()).decode()
        body = json.dumps({"instances": [{"image": {"b64": b64}, "method": "unioncam"}]})
        session = requests.Session()
        timings: dict[str, list[float]] = {name: [] for name in urls}
        maps: dict[str, list] = {}
        for i in range(args.warmup + args.requests):
            for name, url in urls.items():
                t0 = time.perf_counter()
                r = session.post(f"{url}/v1/models/unioncam:explain", data=body, timeout=300,
                                 headers={"Authorization": f"Bearer {keys[name]}", "Content-Type": "application/json"})
                ms = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")
                answer = r.json()["explanations"][0]
                if i >= args.warmup:
                    timings[name].append(ms)
                m = answer["map"]
                maps[name] = torch.frombuffer(bytearray(base64.b64decode(m["data"])), dtype=torch.float16).float()
            if not torch.allclose(maps["torchserve"], maps["kserve"], atol=2e-3, rtol=0):
                raise RuntimeError("the backends' maps differ")
    finally:
        for proc in servers.values():
            _stop(proc)
    doc = {
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _cpu(),
        "versions": {p: metadata.version(p) for p in ("torch", "torchserve", "kserve", "unioncam")},
        "python": platform.python_version(),
        "settings": {"model": "shapes", "weights": "shipped", "image_size": 64, "precision": "fp32", "device": "cpu",
                     "workers_or_replicas": 2, "request": "POST /v1/models/unioncam:explain, 1 instance, unioncam",
                     "warmup": args.warmup, "requests": args.requests, "order": "interleaved, one at a time"},
        "results": {name: _summary(ms) for name, ms in timings.items()},
        "timings_ms": timings,
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "note": args.note,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for name, res in doc["results"].items():
        print(f"{name:11s} p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  (mean {res['mean_ms']:.1f}, "
              f"sd {res['stdev_ms']:.1f}, n {res['n']})")
    print(f"{doc['device']}; written to {out}")


if __name__ == "__main__":
    main()
