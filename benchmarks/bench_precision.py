"""How far bf16 / fp16 UnionCAM maps are from float32 ones: Pearson correlation and the AMS selection.

For every image the same model explains it with ``precision="fp32"`` and with each half precision;
the script reports the Pearson correlation of the two final maps, their largest absolute difference,
whether AMS chose the same map (``selected``), and that agreement again where float32 decided by a
margin (``|β_union − β_region| > 0.01``). Models:

- ``shapes``: the trained :class:`unioncam.models.ShapesCNN` on held-out generated images
  (seed 1, the evaluation's held-out set), 64×64;
- ``tiny``: 12 seeded random tiny CNNs (the test suite's, pre-ReLU layer, sharp softmax) × 16 noise
  images, 32×32 — a hard case with many near-ties;
- ``vgg16``: ``unioncam.load_vgg16(--weights)`` on the two sample photos, then seeded noise images.

    python benchmarks/bench_precision.py --model shapes --images 200
    python benchmarks/bench_precision.py --model tiny
    python benchmarks/bench_precision.py --model vgg16 --weights imagenet --size 224 --images 20 --device cuda

Writes a JSON (device, versions, settings, per-image values) to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_latency import _device_name, _git_commit, _images, _versions, write_json  # noqa: E402

import unioncam  # noqa: E402
from unioncam.validation import PRECISIONS, validate_precision  # noqa: E402

MARGIN = 0.01


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two maps; 1 for identical maps, ``None`` where undefined (a constant map)."""
    if torch.equal(a, b):
        return 1.0
    a, b = a.flatten().double(), b.flatten().double()
    if a.std() == 0 or b.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _workloads(args: argparse.Namespace, device: torch.device) -> Iterator[tuple[str, torch.nn.Module, list]]:
    """``(label, model, images)`` groups to explain."""
    if args.model == "shapes":
        from unioncam.eval.groundtruth import make_sample
        from unioncam.models import load_shapes_cnn

        n = args.images or 200
        yield (
            "ShapesCNN (trained), held-out",
            load_shapes_cnn(device=device),
            [make_sample(1, i, args.size or 64).image for i in range(n)],
        )
    elif args.model == "tiny":
        from tests.models import make_tiny_cnn

        n, size = args.images or 16, args.size or 32
        for seed in range(args.models):
            g = torch.Generator().manual_seed(1000 + seed)
            yield (
                f"tiny CNN seed {seed}",
                make_tiny_cnn(seed=seed).to(device),
                [torch.rand(3, size, size, generator=g) for _ in range(n)],
            )
    else:
        model = unioncam.load_vgg16(args.weights, seed=args.seed, device=device)
        n, size = args.images or 8, args.size or 224
        photos = _images(min(n, 2), size, args.seed)  # the two sample photos, then seeded noise
        g = torch.Generator().manual_seed(args.seed)
        yield (
            f"VGG16 ({args.weights})",
            model,
            photos + [torch.rand(3, size, size, generator=g) for _ in range(n - len(photos))],
        )


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = [p for p in args.precision.split(",") if p]
    for p in precisions:
        validate_precision(p)
    rows: list[dict] = []
    for label, model, images in _workloads(args, device):
        full = unioncam.explain_batch(model, images, method=args.method, batch_size=args.batch_size)
        for prec in precisions:
            half = unioncam.explain_batch(
                model, images, method=args.method, precision=prec, batch_size=args.batch_size
            )
            for i, (a, b) in enumerate(zip(full, half)):
                row = {
                    "group": label,
                    "image": i,
                    "precision": prec,
                    "target": a.target,
                    "pearson": pearson(a.saliency, b.saliency),
                    "max_abs_diff": float((a.saliency - b.saliency).abs().max()),
                }
                if "selected" in a.details:
                    row.update(
                        selected_fp32=a.details["selected"],
                        selected=b.details["selected"],
                        margin=abs(a.details["beta_union"] - a.details["beta_region"]),
                    )
                rows.append(row)
        print(f"{label}: {len(images)} images done", flush=True)
    summary = {p: _summary([r for r in rows if r["precision"] == p]) for p in precisions}
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "versions": _versions(),
        "commit": _git_commit(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summary,
        "rows": rows,
    }


def _summary(rows: list[dict]) -> dict:
    corr = [r["pearson"] for r in rows if r["pearson"] is not None]
    out = {
        "images": len(rows),
        "pearson_defined": len(corr),
        "pearson_median": statistics.median(corr) if corr else None,
        "pearson_min": min(corr) if corr else None,
        "pearson_ge_0999": sum(c >= 0.999 for c in corr),
        "max_abs_diff": max((r["max_abs_diff"] for r in rows), default=None),
    }
    sel = [r for r in rows if "selected" in r]
    if sel:
        wide = [r for r in sel if r["margin"] > MARGIN]
        out.update(
            selected_agree=sum(r["selected"] == r["selected_fp32"] for r in sel),
            selected_agree_pct=100.0 * sum(r["selected"] == r["selected_fp32"] for r in sel) / len(sel),
            margin_gt_001=len(wide),
            selected_agree_margin_gt_001=sum(r["selected"] == r["selected_fp32"] for r in wide),
            union_selected_fp32=sum(bool(r["selected_fp32"]) for r in sel),
        )
    return out


def _print(result: dict) -> None:
    print(f"\n{result['device']}, method {result['settings']['method']}")
    print(
        "| precision | images | Pearson median / min | Pearson ≥ 0.999 | max abs diff | `selected` agrees |"
    )
    print("|---|---|---|---|---|---|")
    for prec, s in result["summary"].items():
        pm = "—" if s["pearson_median"] is None else f"{s['pearson_median']:.5f} / {s['pearson_min']:.4f}"
        agree = "—"
        if "selected_agree" in s:
            agree = (
                f"{s['selected_agree']}/{s['images']} ({s['selected_agree_pct']:.1f} %); "
                f"{s['selected_agree_margin_gt_001']}/{s['margin_gt_001']} where margin > {MARGIN}"
            )
        print(
            f"| {prec} | {s['images']} | {pm} | {s['pearson_ge_0999']}/{s['pearson_defined']} | "
            f"{s['max_abs_diff']:.2e} | {agree} |"
        )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("shapes", "tiny", "vgg16"), default="shapes")
    ap.add_argument("--images", type=int, default=None, help="images (per model for 'tiny')")
    ap.add_argument("--models", type=int, default=12, help="'tiny': how many seeded models")
    ap.add_argument("--size", type=int, default=None, help="square side (shapes 64, tiny 32, vgg16 224)")
    ap.add_argument("--method", default="unioncam",
                    help=f"one of {','.join(sorted(unioncam.METHODS))}, or a comma list (one JSON each, in one process)")
    ap.add_argument("--precision", default="bf16,fp16", help=f"comma list from {','.join(PRECISIONS)}")
    ap.add_argument("--weights", default="random", help="vgg16: 'random', 'imagenet' or a state-dict path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--out", default=None, help="JSON path, '{method}' replaced by the method's name "
        "(default: benchmarks/results/precision-<model>-<device>.json)"
    )
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in unioncam.METHODS]
    if bad or not methods:
        ap.error(f"--method: {bad or 'none given'}; known: {', '.join(sorted(unioncam.METHODS))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {}
    for method in methods:
        args.method = method
        result = measure(args)
        _print(result)
        default = ROOT / "benchmarks" / "results" / f"precision-{args.model}-{result['device_type']}.json"
        write_json(Path(args.out.replace("{method}", method) if args.out else default), result)
    return result


if __name__ == "__main__":
    main()
