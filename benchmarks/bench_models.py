"""Cost of one UnionCAM explanation per torchvision model (seeded random weights, float32).

For each model: one untimed Grad-CAM call (first-call set-up), then one timed ``unioncam.explain`` of one
image: wall time, process CPU time (all threads), the masked forwards it ran (active channels + 3) and
the explained layer's shape. UnionCAM's cost is about ``channels × one forward``: ResNet-50's ``layer4``
has 2048 channels, VGG's ``features.29`` 512.

    python benchmarks/bench_models.py                       # 224², the README's models
    python benchmarks/bench_models.py --size 112 --models resnet18,swin_t
    python benchmarks/bench_models.py --models timm             # the timm rows (models-cpu-224-timm.json)

torchvision's ViTs take only their own image size (224): they run at 224 whatever ``--size`` says, and
the JSON says so per model. Writes ``benchmarks/results/models-<device>-<size>.json`` (or ``--out``) after
every model (``"complete": false`` until the end), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import unioncam  # noqa: E402
from unioncam.models import load_model, model_cost  # noqa: E402

MODELS = ("vgg16", "resnet18", "resnet50", "vgg11", "vgg13_bn", "vgg19", "densenet121", "efficientnet_b0",
          "mobilenet_v3_large", "convnext_tiny", "regnet_y_800mf", "swin_t", "vit_b_16")
#: ``--models timm``: timm models by name, one per family of docs/models.md's timm table (small members).
TIMM_MODELS = ("timm/resnet18", "timm/regnetx_002", "timm/efficientnet_b0", "timm/mobilenetv3_large_100",
               "timm/convnext_atto", "timm/densenet121", "timm/swin_tiny_patch4_window7_224",
               "timm/vit_tiny_patch16_224", "timm/deit_tiny_distilled_patch16_224", "timm/eva02_tiny_patch14_224")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated load_model names (timm/<name> too), or 'timm' for TIMM_MODELS")
    ap.add_argument("--size", type=int, default=224, help="image side (ViTs: their own); default 224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads; default torch's")
    ap.add_argument("--batch-size", type=int, default=None, help="masked inputs per forward; default the engine's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    names = list(TIMM_MODELS) if args.models == "timm" else args.models.split(",")
    tail = "-timm" if all(n.startswith("timm/") for n in names) else ""  # its own file: the torchvision rows stay
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"models-{dev.type}-{args.size}{tail}.json")
    record = {
        "what": "one UnionCAM explanation per model, seeded random weights, the engine's precision (auto: per row)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "size": args.size,
        "batch_size": args.batch_size,
        "complete": False,
        "models": {},
    }
    g = torch.Generator().manual_seed(0)
    for name in names:
        model = load_model(name, "random", device=dev)
        fixed = getattr(model, "input_size", None)
        side = fixed[0] if fixed else args.size
        img = torch.rand(3, side, side, generator=g)
        unioncam.explain(model, img, method="gradcam")  # first-call set-up, untimed
        cpu0, t0 = time.process_time(), time.perf_counter()
        res = unioncam.explain(model, img, method="unioncam", batch_size=args.batch_size)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        d = res.details
        record["models"][name] = {
            "size": side, "layer": d["layer"], "channels": d["channels"], "masked_forwards": d["masked_forwards"],
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "ms_per_masked_forward": round(1000 * wall / max(1, d["masked_forwards"]), 3),
            "selected": d["selected"], "precision": d["precision"],
            "gflops": round(model_cost(name, side).gflops, 2),
        }
        print(f"{name:36s} {side}²  {d['layer']:40s} K={d['channels']:5d}  fwd={d['masked_forwards']:5d}  "
              f"wall {wall:8.1f} s  cpu {cpu:8.1f} s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        del model
    record["complete"] = True
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
