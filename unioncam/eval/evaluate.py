"""``unioncam evaluate``: every metric of :mod:`unioncam.metrics` for several methods over an image folder.

Layout read (all optional but the images)::

    FOLDER/<class>/<name>.<ext>      ImageNet style: the sorted sub-folder names are the class indices
    FOLDER/<name>.<ext>              or a flat folder: the model's predicted class is explained
    --annotations DIR/<name>.xml     Pascal VOC boxes (union of the file's objects) → pointing games
    --masks DIR/<name>.png           object masks (non-zero = object) → pointing games

Results go to ``OUT/results.jsonl``, one line per (image, method), appended as soon as an image is
scored: a rerun with the same settings skips what is there, so an interrupted run loses at most the
chunk in flight. The table (``OUT/results.{md,csv,json}``) is rebuilt from that file at the end.

Many processes: ``torchrun --nproc-per-node N -m unioncam evaluate ...`` (multi-node flags alike). Rank R
scores every N-th image of the sampled list on ``cuda:LOCAL_RANK`` (CPU without CUDA) and appends its rows
to ``OUT/results.rank<R>.jsonl``; after a barrier rank 0 merges them into ``OUT/results.jsonl`` and writes
the same tables a single process would.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
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

from ..errors import InvalidInputError

__all__ = ["METRICS", "EvalSettings", "add_parser", "evaluate", "find_images", "summarize"]

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


# ------------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, requested: str | None) -> str | None:
        """``--device`` when given; else under torchrun ``cuda:LOCAL_RANK`` with CUDA, otherwise the CPU."""
        if requested is not None or not self.active:
            return requested
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def init(self, device: str | None) -> bool:
        """Join the process group (NCCL on CUDA, gloo otherwise); True when this call created it."""
        import torch.distributed as dist

        if not self.active or dist.is_initialized():
            return False
        cuda = device is not None and str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
        return True

    def barrier(self, device: str | None) -> None:
        import torch.distributed as dist

        if not self.active:
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.device(device).index or 0])
        else:
            dist.barrier()


def _row_files(out: Path) -> list[Path]:
    """``results.jsonl`` and every rank's ``results.rank<R>.jsonl`` in ``out``."""
    ranks = sorted(out.glob("results.rank*.jsonl"), key=lambda p: p.name)
    return [p for p in [out / "results.jsonl", *ranks] if p.is_file()]


def _merge_rows(out: Path, items: list[Item], methods: list[str]) -> None:
    """Fold the rank files into ``results.jsonl`` (one row per (image, method), in sample then method order)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for p in _row_files(out):
        for r in _read_jsonl(p):
            seen.setdefault((r["image"], r["method"]), r)
    order = {it.key: i for i, it in enumerate(items)}
    morder = {m: i for i, m in enumerate(methods)}
    rows = sorted(seen.values(), key=lambda r: (order.get(r["image"], len(order)), r["image"],
                                               morder.get(r["method"], len(morder)), r["method"]))
    tmp = out / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "results.jsonl")
    for p in out.glob("results.rank*.jsonl"):
        p.unlink()


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


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate` scores and how; the command line's options have the same names."""

    method: tuple[str, ...] = ("unioncam", "gradcam")  #: methods to score
    model: str = "vgg16"  #: a :func:`unioncam.models.load_model` name (recorded even when a model is passed)
    weights: str | None = None  #: the model's weights (see ``load_model``)
    weights_seed: int = 0  #: seed of ``weights="random"``
    size: int = 224  #: images are resized to ``size``×``size``
    limit: int | None = None  #: score a random sample of this many images
    seed: int = 0  #: seed of that sample
    theta: float = 10.0  #: UnionCAM's θ
    layer: str | None = None  #: explained layer; ``None`` → the model's ``default_layer``
    #: insertion/deletion pixels per step; ``None`` → ``size`` (224 per step at 224×224, Petsiuk et al.'s)
    pixels_per_step: int | None = None
    #: ``False`` skips those two curves (``2·⌈H·W / pixels_per_step⌉ + 2`` forwards per image and method, by
    #: far the costliest metrics): the paper's Table 1 needs only Average Drop / Increase
    insertion_deletion: bool = True
    targets: str = "auto"  #: ``auto``, ``folders`` or ``predicted`` (see :func:`find_images`)
    annotations: str | None = None  #: folder of Pascal VOC XML files
    masks: str | None = None  #: folder of object masks
    batch_size: int = 64  #: inputs per forward pass
    chunk: int = 8  #: images explained together
    device: str | None = None  #: torch device


def evaluate(folder: str | Path, out: str | Path, settings: EvalSettings = EvalSettings(),
             model: nn.Module | None = None, progress: bool = True) -> dict[str, Any]:
    """Score ``settings.method`` on (a ``limit``-sized, ``seed``-ed random sample of) the images in ``folder``.

    Every method explains the same images. Per-image rows are appended to ``out/results.jsonl``; rows
    already there (same settings) are kept and not recomputed. Returns the summary also written to
    ``out/results.json`` (and as markdown and CSV). ``model``: a loaded model to use instead of loading
    ``settings.model``. Maps stay on the model's device between explaining and scoring; Average Drop and
    Increase reuse each explanation's own score ``f_c(x)``.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each rank scores its share of the sample (every
    ``WORLD_SIZE``-th image from its ``RANK``) into ``out/results.rank<RANK>.jsonl``; rank 0 merges them
    after a barrier and writes the tables; every rank returns the same summary.
    """
    from tqdm.auto import tqdm

    from ..api import explain_batch
    from ..io import decode_image, to_pixels
    from ..models import load_model
    from ..validation import validate_method, validate_theta
    from . import metrics as M

    cfg = settings
    methods = [validate_method(m) for m in cfg.method]
    theta = validate_theta(cfg.theta)
    size, chunk, limit = cfg.size, cfg.chunk, cfg.limit
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InvalidInputError("size", f"{size!r}", "an integer ≥ 8")
    pps = cfg.pixels_per_step or size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InvalidInputError("chunk", f"{chunk!r}", "an integer ≥ 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items, classes = find_images(folder, cfg.targets)
    n_found = len(items)
    if limit is not None:
        if limit < 1:
            raise InvalidInputError("limit", f"{limit!r}", "an integer ≥ 1")
        items = random.Random(cfg.seed).sample(items, min(limit, len(items)))
    ann = Path(cfg.annotations) if cfg.annotations else None
    msk = Path(cfg.masks) if cfg.masks else None
    for name, p in (("annotations", ann), ("masks", msk)):
        if p is not None and not p.is_dir():
            raise InvalidInputError(name, f"{str(p)!r} is not a directory", "a folder")

    config = {
        "folder": str(folder),
        "model": cfg.model,
        "weights": cfg.weights,
        "seed_weights": cfg.weights_seed,
        "size": size,
        "theta": theta,
        "layer": cfg.layer,
        "pixels_per_step": pps,
        "insertion_deletion": bool(cfg.insertion_deletion),
        "targets": "folders" if classes else "predicted",
        "annotations": str(ann) if ann else None,
        "masks": str(msk) if msk else None,
    }
    world = Dist.from_env()
    device = world.device(cfg.device)
    cfg_path = out / "config.json"
    rows_path = out / (f"results.rank{world.rank}.jsonl" if world.active else "results.jsonl")
    if cfg_path.is_file() and _row_files(out):
        old = json.loads(cfg_path.read_text())
        if _run_key(old) != _run_key(config):
            diff = {k: (old.get(k), config[k]) for k in _run_key(config) if old.get(k) != config[k]}
            raise InvalidInputError(
                "out",
                f"{str(out)!r} holds results of other settings {diff}",
                "the same settings to resume, or a new --out folder",
            )
    if world.rank == 0:  # written whole, then renamed: another rank may be reading it
        tmp_cfg = out / "config.json.tmp"
        tmp_cfg.write_text(json.dumps(config, indent=2) + "\n")
        tmp_cfg.replace(cfg_path)
    created = world.init(device)

    if model is None:
        model = load_model(cfg.model, cfg.weights, cfg.weights_seed, device)
    batch_size = cfg.batch_size
    # Rows of every file count as done (a resume with another number of processes reshuffles the shares).
    done = {(r["image"], r["method"]) for p in _row_files(out) for r in _read_jsonl(p)}
    mine = items[world.rank :: world.world]
    todo = [(it, m) for it in mine for m in methods if (it.key, m) not in done]
    bar = tqdm(
        total=len(mine) * len(methods),
        initial=len(mine) * len(methods) - len(todo),
        unit="map",
        desc="evaluate" if not world.active else f"evaluate (rank 0 of {world.world})",
        disable=not progress or world.rank != 0,
    )
    pending_items = [it for it in mine if any((it.key, m) not in done for m in methods)]
    with rows_path.open("a") as sink:
        for c in range(0, len(pending_items), chunk):
            group = pending_items[c : c + chunk]
            pixels, regions = [], []
            for it in group:
                pil = decode_image(it.path.read_bytes(), field=f"image {it.key!r}")
                pixels.append(to_pixels(pil, size, getattr(model, "interpolation", "bilinear")))  # timm: its own
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
                    targets=[group[i].target for i in idx],
                    method=method,
                    theta=theta,
                    layer=cfg.layer,
                    batch_size=batch_size,
                    keep_on_device=True,
                )
                seconds = (time.perf_counter() - start) / len(idx)
                xs, sal = x[idx], torch.stack([r.saliency for r in res])
                tg = [r.target for r in res]
                drop, increase = M.drop_and_increase(model, xs, sal, tg, batch_size,
                                                     scores=torch.tensor([r.score for r in res]))
                vals = {"average_drop": drop, "average_increase": increase}
                if cfg.insertion_deletion:
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
    if world.active:
        world.barrier(device)  # every rank's rows are on disk
        if world.rank != 0:
            world.barrier(device)  # rank 0 has merged and written the tables
            if created:
                import torch.distributed as dist

                dist.destroy_process_group()
            return json.loads((out / "results.json").read_text())
    if world.active or any(out.glob("results.rank*.jsonl")):  # also a one-process resume of a torchrun run
        _merge_rows(out, items, methods)
    keys = {it.key for it in items}
    rows = [r for r in _read_jsonl(out / "results.jsonl") if r["image"] in keys and r["method"] in methods]
    summary = summarize(rows, methods)
    summary["settings"] = {
        **config,
        "images_found": n_found,
        "images": len(items),
        "limit": limit,
        "seed": cfg.seed,
        "methods": methods,
        "classes": classes,
        "chunk": chunk,
        "device": str(next(iter(model.parameters())).device),
    }
    write_tables(summary, out)
    if world.active:
        world.barrier(device)
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
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
        # Sorted by image: sums do not depend on the order rows were written in (one process or many).
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: str(r["image"]))
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
    from ..models.defaults import resolve_args

    given = args.weights
    resolve_args(args, "evaluate")
    if given is None and args.weights in ("imagenet", "shipped"):
        args.weights = None  # the model's default weights, recorded as before: earlier runs' rows still match
    names = {f.name for f in dataclasses.fields(EvalSettings)}
    options = {k: v for k, v in vars(args).items() if k in names}
    options["method"] = tuple(options["method"])
    summary = evaluate(args.folder, args.out, EvalSettings(**options), progress=not args.quiet)
    if Dist.from_env().rank == 0:
        print((Path(args.out) / "results.md").read_text(), end="")
    return 0 if summary["table"] else 1


def add_parser(subparsers: Any) -> None:
    """Register ``unioncam evaluate``."""
    from ..models.defaults import MODEL_HELP, WEIGHTS_HELP
    from ..validation import methods_arg, positive_int_arg, theta_arg

    p = subparsers.add_parser(
        "evaluate",
        help="score methods with Average Drop/Increase, insertion/deletion and pointing games over a folder",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", help="image folder (class sub-folders give the targets)")
    p.add_argument(
        "--method",
        type=methods_arg,
        default=["unioncam", "gradcam"],
        help="comma-separated methods or 'all'; default unioncam,gradcam",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP.format(factory=" or package.module:factory"))
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--weights-seed", type=int, default=0, help="seed of --weights random; default 0")
    p.add_argument("--image-size", "--size", dest="size", type=positive_int_arg, default=None,
                   help="resize images to SIZE×SIZE; default the model's own: 64 for shapes, else 224")
    p.add_argument("--limit", type=positive_int_arg, default=None, help="score a random sample of LIMIT images")
    p.add_argument("--sample-seed", "--seed", dest="seed", type=int, default=0,
                   help="seed of the --limit sample; default 0 (--seed is its old spelling; the weights' seed "
                   "is --weights-seed, as in every command)")
    p.add_argument("--theta", type=theta_arg, default=10.0, help="UnionCAM θ; default 10")
    p.add_argument("--layer", default=None, help="layer to explain; default the model's default_layer")
    p.add_argument(
        "--pixels-per-step", type=int, default=None, help="insertion/deletion pixels per step; default SIZE"
    )
    p.add_argument(
        "--no-insertion-deletion",
        dest="insertion_deletion",
        action="store_false",
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
    p.add_argument("--batch-size", type=positive_int_arg, default=64, help="inputs per forward pass; default 64")
    p.add_argument("--chunk", type=positive_int_arg, default=8, help="images explained together; default 8")
    p.add_argument("--device", default=None,
                   help="torch device; default cpu (under torchrun: cuda:LOCAL_RANK with CUDA, else cpu)")
    p.add_argument("--out", default="eval-out", help="output folder; default ./eval-out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
