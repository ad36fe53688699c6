"""``unioncam evaluate``: every metric of :mod:`unioncam.metrics` for several methods over an image folder.

Layout read (all optional but the images)::

    FOLDER/<class>/<name>.<ext>      ImageNet style: the sorted sub-folder names are the class indices
    FOLDER/<name>.<ext>              or a flat folder: the model's predicted class is explained
    --annotations DIR/<name>.xml     Pascal VOC boxes (union of the file's objects) → pointing games
    --masks DIR/<name>.png           object masks (non-zero = object) → pointing games

Results go to ``OUT/results.jsonl``, one line per (image, method), appended as soon as an image is
scored: a rerun with the same settings skips what is there, so an interrupted run loses at most the
chunk in flight. The table (``OUT/results.{md,csv,json}``) is rebuilt from that file at the end.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .errors import InvalidInputError

__all__ = ["METRICS", "add_parser", "evaluate", "find_images", "load_model", "summarize"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

#: Column key → (heading, better direction).
METRICS: dict[str, tuple[str, str]] = {
    "average_drop": ("Average Drop (%)", "↓"),
    "average_increase": ("Average Increase (%)", "↑"),
    "insertion": ("Insertion AUC", "↑"),
    "deletion": ("Deletion AUC", "↓"),
    "pointing_game": ("Pointing game", "↑"),
    "energy_pointing_game": ("Energy pointing game", "↑"),
    "seconds": ("s / image", ""),
}


@dataclass
class Item:
    """One image to score: its key (path relative to the folder), its path and its target (None: predicted)."""

    key: str
    path: Path
    target: int | None


# ---------------------------------------------------------------------------------------- discovery


def find_images(folder: str | Path, targets: str = "auto") -> tuple[list[Item], list[str] | None]:
    """All images under ``folder`` (sorted) and the class names if sub-folders give targets.

    ``targets``: ``"folders"`` (sub-folder = class, sorted names = indices, as ImageNet's wnids),
    ``"predicted"`` (explain the arg-max class) or ``"auto"`` (folders when every image sits in a
    direct sub-folder and there are at least two, else predicted).
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError("folder", f"{str(folder)!r} is not a directory", "a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise InvalidInputError(
            "folder", f"{str(folder)!r} holds no images", f"files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    depth_one = all(len(p.relative_to(root).parts) == 2 for p in paths)
    classes = sorted({p.parent.name for p in paths}) if depth_one else None
    if targets == "auto":
        targets = "folders" if classes is not None and len(classes) >= 2 else "predicted"
    if targets == "folders":
        if classes is None:
            raise InvalidInputError(
                "targets",
                "'folders' asked for, but not every image is in a class sub-folder",
                "FOLDER/<class>/<image>, or --targets predicted",
            )
        index = {c: i for i, c in enumerate(classes)}
        return [Item(str(p.relative_to(root)), p, index[p.parent.name]) for p in paths], classes
    if targets != "predicted":
        raise InvalidInputError("targets", f"{targets!r}", "auto, folders or predicted")
    return [Item(str(p.relative_to(root)), p, None) for p in paths], None


def _voc_boxes(path: Path, size: int, orig: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """VOC boxes (1-based inclusive) → ``(x0, y0, x1, y1)`` exclusive, scaled to the ``size``×``size`` input."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InvalidInputError(
            f"annotation {str(path)!r}", f"cannot be read ({exc})", "Pascal VOC XML"
        ) from exc
    sx, sy = size / orig[0], size / orig[1]
    boxes = []
    for bb in root.iter("bndbox"):
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"annotation {str(path)!r}",
                "has a bndbox without numeric xmin/ymin/xmax/ymax",
                "Pascal VOC XML",
            ) from exc
        boxes.append(((xmin - 1) * sx, (ymin - 1) * sy, xmax * sx, ymax * sy))
    if not boxes:
        raise InvalidInputError(f"annotation {str(path)!r}", "has no <bndbox>", "Pascal VOC XML with objects")
    return boxes


def _region(
    item: Item, size: int, orig: tuple[int, int], annotations: Path | None, masks: Path | None
) -> Any:
    stem = Path(item.key).stem
    if masks is not None:
        p = masks / f"{stem}.png"
        if not p.is_file():
            raise InvalidInputError(
                "masks", f"no mask {str(p)!r} for image {item.key!r}", "DIR/<image stem>.png"
            )
        m = Image.open(p).convert("L").resize((size, size), Image.Resampling.NEAREST)
        return torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).view(size, size) > 0
    if annotations is not None:
        p = annotations / f"{stem}.xml"
        if not p.is_file():
            raise InvalidInputError(
                "annotations", f"no annotation {str(p)!r} for image {item.key!r}", "DIR/<image stem>.xml"
            )
        return _voc_boxes(p, size, orig)
    return None


# ------------------------------------------------------------------------------------------- models


def load_model(name: str, weights: str | None = None, seed: int = 0, device: str | None = None) -> nn.Module:
    """``vgg16`` (``weights``: imagenet, random or a path), ``shapes`` (the ground-truth benchmark's CNN;
    ``weights``: a path, default the committed file) or ``package.module:factory`` (called with no
    arguments; must return a pixel-space classifier, with ``default_layer`` or used with ``--layer``)."""
    if name == "vgg16":
        from .models import load_vgg16

        return load_vgg16(weights or "imagenet", seed=seed, device=device)
    if name == "shapes":
        from .groundtruth import load_shapes_cnn

        return load_shapes_cnn(weights, device=device)
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidInputError(
                "model", f"{name!r} cannot be imported ({exc})", "vgg16, shapes or module:factory"
            ) from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                "model", f"{name!r} returned a {type(model).__name__}", "a torch.nn.Module"
            )
        model.eval().requires_grad_(False)
        return model.to(device) if device is not None else model
    raise InvalidInputError("model", f"{name!r}", "vgg16, shapes or package.module:factory")


# --------------------------------------------------------------------------------------------- run


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption: that pair is simply scored again
    return rows


def _run_key(args: dict[str, Any]) -> dict[str, Any]:
    # Settings that change the numbers: a rerun with different ones must not mix its rows with these.
    keys = (
        "folder",
        "model",
        "weights",
        "seed_weights",
        "size",
        "theta",
        "layer",
        "pixels_per_step",
        "targets",
        "annotations",
        "masks",
    )
    # Runs written before the option existed always scored insertion/deletion.
    return {**{k: args.get(k) for k in keys}, "insertion_deletion": args.get("insertion_deletion", True)}


def evaluate(
    folder: str | Path,
    out: str | Path,
    methods: Iterable[str] = ("unioncam", "gradcam"),
    model: nn.Module | None = None,
    model_name: str = "vgg16",
    weights: str | None = None,
    seed_weights: int = 0,
    size: int = 224,
    limit: int | None = None,
    seed: int = 0,
    theta: float = 10.0,
    layer: str | None = None,
    pixels_per_step: int | None = None,
    targets: str = "auto",
    annotations: str | Path | None = None,
    masks: str | Path | None = None,
    batch_size: int = 64,
    chunk: int = 8,
    device: str | None = None,
    progress: bool = True,
    insertion_deletion: bool = True,
) -> dict[str, Any]:
    """Score ``methods`` on (a ``limit``-sized, ``seed``-ed random sample of) the images in ``folder``.

    Every method explains the same images. Per-image rows are appended to ``out/results.jsonl``; rows
    already there (same settings) are kept and not recomputed. Returns the summary also written to
    ``out/results.json`` (and as markdown and CSV).

    ``pixels_per_step`` defaults to ``size`` (224 per step at 224×224, Petsiuk et al.'s setting).
    ``insertion_deletion=False`` skips those two curves (``2·⌈H·W / pixels_per_step⌉ + 2`` forwards per
    image and method, by far the most expensive metrics): the paper's Table 1 needs only Average
    Drop / Increase.
    """
    from tqdm.auto import tqdm

    from . import metrics as M
    from .engine import explain_batch, validate_method, validate_theta
    from .io import decode_image, to_pixels

    methods = [validate_method(m) for m in methods]
    theta = validate_theta(theta)
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InvalidInputError("size", f"{size!r}", "an integer ≥ 8")
    pps = pixels_per_step or size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InvalidInputError("chunk", f"{chunk!r}", "an integer ≥ 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items, classes = find_images(folder, targets)
    n_found = len(items)
    if limit is not None:
        if limit < 1:
            raise InvalidInputError("limit", f"{limit!r}", "an integer ≥ 1")
        items = random.Random(seed).sample(items, min(limit, len(items)))
    ann = Path(annotations) if annotations else None
    msk = Path(masks) if masks else None
    for name, p in (("annotations", ann), ("masks", msk)):
        if p is not None and not p.is_dir():
            raise InvalidInputError(name, f"{str(p)!r} is not a directory", "a folder")

    config = {
        "folder": str(folder),
        "model": model_name,
        "weights": weights,
        "seed_weights": seed_weights,
        "size": size,
        "theta": theta,
        "layer": layer,
        "pixels_per_step": pps,
        "insertion_deletion": bool(insertion_deletion),
        "targets": "folders" if classes else "predicted",
        "annotations": str(ann) if ann else None,
        "masks": str(msk) if msk else None,
    }
    cfg_path, rows_path = out / "config.json", out / "results.jsonl"
    if cfg_path.is_file() and rows_path.is_file():
        old = json.loads(cfg_path.read_text())
        if _run_key(old) != _run_key(config):
            diff = {k: (old.get(k), config[k]) for k in _run_key(config) if old.get(k) != config[k]}
            raise InvalidInputError(
                "out",
                f"{str(out)!r} holds results of other settings {diff}",
                "the same settings to resume, or a new --out folder",
            )
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")

    if model is None:
        model = load_model(model_name, weights, seed_weights, device)
    done = {(r["image"], r["method"]) for r in _read_jsonl(rows_path)}
    todo = [(it, m) for it in items for m in methods if (it.key, m) not in done]
    bar = tqdm(
        total=len(items) * len(methods),
        initial=len(items) * len(methods) - len(todo),
        unit="map",
        desc="evaluate",
        disable=not progress,
    )
    pending_items = [it for it in items if any((it.key, m) not in done for m in methods)]
    with rows_path.open("a") as sink:
        for c in range(0, len(pending_items), chunk):
            group = pending_items[c : c + chunk]
            pixels, regions = [], []
            for it in group:
                pil = decode_image(it.path.read_bytes(), field=f"image {it.key!r}")
                pixels.append(to_pixels(pil, size))
                regions.append(_region(it, size, pil.size, ann, msk))
            x = torch.stack(pixels)
            for method in methods:
                idx = [i for i, it in enumerate(group) if (it.key, method) not in done]
                if not idx:
                    continue
                start = time.perf_counter()
                res = explain_batch(
                    model,
                    [x[i] for i in idx],
                    [group[i].target for i in idx],
                    method=method,
                    theta=theta,
                    layer=layer,
                    batch_size=batch_size,
                )
                seconds = (time.perf_counter() - start) / len(idx)
                xs, sal = x[idx], torch.stack([r.saliency for r in res])
                tg = [r.target for r in res]
                vals = {
                    "average_drop": M.average_drop(model, xs, sal, tg, batch_size, per_image=True),
                    "average_increase": M.average_increase(model, xs, sal, tg, batch_size, per_image=True),
                }
                if insertion_deletion:
                    vals["insertion"] = M.insertion_auc(model, xs, sal, tg, pps, batch_size, per_image=True)
                    vals["deletion"] = M.deletion_auc(model, xs, sal, tg, pps, batch_size, per_image=True)
                have_region = [j for j, i in enumerate(idx) if regions[i] is not None]
                if have_region:
                    reg = [regions[idx[j]] for j in have_region]
                    pg = M.pointing_game(sal[have_region], reg, per_image=True)
                    epg = M.energy_pointing_game(sal[have_region], reg, per_image=True)
                for j, (i, r) in enumerate(zip(idx, res)):
                    row = {
                        "image": group[i].key,
                        "method": method,
                        "target": r.target,
                        "score": r.score,
                        "seconds": seconds,
                        **{k: float(v[j]) for k, v in vals.items()},
                    }
                    if j in have_region:
                        row["pointing_game"] = float(pg[have_region.index(j)])
                        row["energy_pointing_game"] = float(epg[have_region.index(j)])
                    if method == "unioncam":
                        row["selected"] = r.details.get("selected")
                    sink.write(json.dumps(row) + "\n")
                sink.flush()
                bar.update(len(idx))
    bar.close()
    keys = {it.key for it in items}
    rows = [r for r in _read_jsonl(rows_path) if r["image"] in keys and r["method"] in methods]
    summary = summarize(rows, methods)
    summary["settings"] = {
        **config,
        "images_found": n_found,
        "images": len(items),
        "limit": limit,
        "seed": seed,
        "methods": methods,
        "classes": classes,
        "chunk": chunk,
        "device": str(next(iter(model.parameters())).device),
    }
    write_tables(summary, out)
    return summary


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(rows: list[dict[str, Any]], methods: Iterable[str]) -> dict[str, Any]:
    """Mean and standard error (sample s.d. / √n) of every metric per method, from per-image rows."""
    table = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"method": method, "n": len(mine)}
        for key in METRICS:
            vals = [r[key] for r in mine if key in r]
            if vals:
                entry[key], entry[key + "_se"] = _mean_se(vals)
        sel = [r["selected"] for r in mine if r.get("selected")]
        if sel:
            entry["union_selected"] = sum(s == "union" for s in sel) / len(sel)
        table.append(entry)
    return {"table": table}


def _fmt(entry: dict[str, Any], key: str) -> str:
    if key not in entry:
        return "–"
    digits = 2 if key in ("average_drop", "average_increase") else (3 if key == "seconds" else 4)
    se = entry[key + "_se"]
    if key == "seconds":  # one time per chunk of images, shared by them: a standard error would mislead
        return f"{entry[key]:.{digits}f}"
    return f"{entry[key]:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def write_tables(summary: dict[str, Any], out: Path) -> None:
    """``results.json`` (everything), ``results.csv`` (one row per method) and ``results.md``."""
    table = summary["table"]
    keys = [k for k in METRICS if any(k in e for e in table)]
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "n"] + [c for k in keys for c in (k, k + "_se")])
        for e in table:
            w.writerow(
                [e["method"], e["n"]] + [c for k in keys for c in (e.get(k, ""), e.get(k + "_se", ""))]
            )
    head = "| method | n | " + " | ".join(f"{METRICS[k][0]} {METRICS[k][1]}".strip() for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for e in table:
        lines.append(f"| {e['method']} | {e['n']} | " + " | ".join(_fmt(e, k) for k in keys) + " |")
    s = summary.get("settings", {})
    note = s.get("note") or (
        f"mean ± standard error over n images; model {s.get('model')} ({s.get('weights') or 'default weights'}), "
        f"{s.get('size')}×{s.get('size')}, θ = {s.get('theta')}, {s.get('pixels_per_step')} pixels per "
        f"insertion/deletion step, targets: {s.get('targets')}, device {s.get('device')}; s / image: "
        f"explanation only (not the metrics), images explained {s.get('chunk')} at a time."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + note + "\n")


# ----------------------------------------------------------------------------------------------- CLI


def _cmd(args: argparse.Namespace) -> int:
    summary = evaluate(
        args.folder,
        args.out,
        args.method,
        model_name=args.model,
        weights=args.weights,
        seed_weights=args.weights_seed,
        size=args.size,
        limit=args.limit,
        seed=args.seed,
        theta=args.theta,
        layer=args.layer,
        pixels_per_step=args.pixels_per_step,
        targets=args.targets,
        annotations=args.annotations,
        masks=args.masks,
        batch_size=args.batch_size,
        chunk=args.chunk,
        device=args.device,
        progress=not args.quiet,
        insertion_deletion=not args.no_insertion_deletion,
    )
    print((Path(args.out) / "results.md").read_text(), end="")
    return 0 if summary["table"] else 1


def add_parser(subparsers: Any) -> None:
    """Register ``unioncam evaluate``."""
    from .cli import _parse_methods, _parse_theta

    p = subparsers.add_parser(
        "evaluate",
        help="score methods with Average Drop/Increase, insertion/deletion and pointing games over a folder",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", help="image folder (class sub-folders give the targets)")
    p.add_argument(
        "--method",
        type=_parse_methods,
        default=["unioncam", "gradcam"],
        help="comma-separated methods or 'all'; default unioncam,gradcam",
    )
    p.add_argument(
        "--model",
        default="vgg16",
        help="vgg16 (default), shapes (the ground-truth benchmark's CNN) or package.module:factory",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="vgg16: imagenet (default), random or a path; shapes: a path (default: the committed weights)",
    )
    p.add_argument("--weights-seed", type=int, default=0, help="seed of --weights random; default 0")
    p.add_argument("--size", type=int, default=224, help="resize images to SIZE×SIZE; default 224")
    p.add_argument("--limit", type=int, default=None, help="score a random sample of LIMIT images")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit sample; default 0")
    p.add_argument("--theta", type=_parse_theta, default=10.0, help="UnionCAM θ; default 10")
    p.add_argument("--layer", default=None, help="layer to explain; default the model's default_layer")
    p.add_argument(
        "--pixels-per-step", type=int, default=None, help="insertion/deletion pixels per step; default SIZE"
    )
    p.add_argument(
        "--no-insertion-deletion",
        action="store_true",
        help="skip the insertion/deletion curves (the costliest metrics; Table 1 needs only Drop/Increase)",
    )
    p.add_argument(
        "--targets",
        choices=("auto", "folders", "predicted"),
        default="auto",
        help="classes from sub-folders, or the predicted class; default auto",
    )
    p.add_argument("--annotations", default=None, help="folder of Pascal VOC XML files (<image stem>.xml)")
    p.add_argument(
        "--masks", default=None, help="folder of object masks (<image stem>.png, non-zero = object)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass; default 64")
    p.add_argument("--chunk", type=int, default=8, help="images explained together; default 8")
    p.add_argument("--device", default=None, help="torch device; default cpu")
    p.add_argument("--out", default="eval-out", help="output folder; default ./eval-out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
