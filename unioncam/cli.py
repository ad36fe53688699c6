"""``unioncam`` command line: explain images (and, from their modules, archive / serve / evaluate)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

# Sub-commands that live in their own modules: each module has ``add_parser(subparsers)``, which
# registers its command with ``set_defaults(func=...)``. Imported lazily so `unioncam --help` is quick
# and a missing optional extra only breaks its own command.
_PLUGIN_MODULES: tuple[str, ...] = ("unioncam.serve.runner", "unioncam.eval.evaluate", "unioncam.eval.figure")


def _weights_label(weights: str | None, seed: int) -> str | None:
    from .models.defaults import weights_label as label

    return None if weights is None else label(weights, seed)


def _result_line(png: str, label: str, res, method: str, weights: str | None) -> str:
    """What the command prints for one explanation: the file, the class, and what the result is."""
    extra = f" selected={res.details['selected']}" if method == "unioncam" else ""
    notes = []
    if res.details.get("beta_tie"):
        notes.append(f"β_union = β_region to float32 rounding: a tie, which the strict rule gave to the "
                     f"{res.details['selected']} map")
    if weights is not None and weights.startswith("random"):
        notes.append(f"RANDOM weights ({weights}): the class and the map mean nothing")
    if float(res.saliency.max()) == float(res.saliency.min()):
        notes.append("flat map: every pixel has the same value, it points at nothing")
    tail = "".join(f"  [{n}]" for n in notes)
    return f"{png}  class {label}  p={res.score:.4f}{extra}  {res.details['seconds']:.2f}s{tail}"


def _cmd_explain(args: argparse.Namespace) -> int:
    from . import load_image
    from .api import Progress, job_rows
    from .methods import get as get_method
    from .models import load_model
    from .models.cost import default_interpolation
    from .models.defaults import resolve_args

    if args.top_k is not None and args.target is not None:
        raise ValueError("--top-k and --target exclude each other")
    resolve_args(args, "explain")
    images, names = [], []
    interpolation = default_interpolation(args.model)
    for path in args.images:  # read every image before the (slow) model load: a bad file fails at once
        images.append(load_image(path, size=args.size, interpolation=interpolation))
        names.append(Path(path).stem)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, args.weights, seed=args.weights_seed, device=args.device)
    cats = getattr(model, "categories", None)
    several = isinstance(args.target, list)
    # One bar over the whole job (every image and method), its total known before the first forward.
    rows = job_rows([args.target] * len(images), args.top_k)
    bar = None
    if not args.quiet and any(get_method(m).masked for m in args.method):
        bar = Progress([(get_method(m), rows) for m in args.method])
    try:
        _explain_all(args, model, images, names, out, cats, several, bar)
    finally:
        if bar is not None:
            bar.close()
    return 0


def _explain_all(args, model, images, names, out, cats, several, bar) -> None:
    from . import explain_batch
    from .viz import overlay

    weights = _weights_label(args.weights, args.weights_seed)
    for method in args.method:
        results = explain_batch(model, images, targets=[args.target] * len(images), method=method, theta=args.theta,
                                layer=args.layer, batch_size=args.batch_size,
                                progress=bar if bar is not None else False,
                                precision=args.precision, top_k=args.top_k)
        if args.top_k is not None:
            rows = [(name, f"{name}.{method}.top{r + 1}", img, res)
                    for name, img, per in zip(names, images, results) for r, res in enumerate(per)]
        elif several:
            rows = [(name, f"{name}.{method}.class{res.target}", img, res)
                    for name, img, per in zip(names, images, results) for res in per]
        else:
            rows = [(name, f"{name}.{method}", img, res) for name, img, res in zip(names, images, results)]
        for name, stem_name, img, res in rows:
            stem = out / stem_name
            overlay(img, res.saliency, alpha=args.alpha, cmap=args.cmap).save(f"{stem}.png")
            record = {
                "image": name,
                "method": method,
                "target": res.target,
                "class_name": cats[res.target] if cats else None,
                "score": res.score,
                "model": args.model,
                "weights": weights,
                "size": list(res.saliency.shape),
                "details": res.details,
            }
            Path(f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
            label = f"{res.target} ({record['class_name']})" if cats else str(res.target)
            line = _result_line(f"{stem}.png", label, res, method, weights)
            if bar is not None:
                bar.write(line)
            else:
                print(line)


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .models.defaults import MODEL_HELP, WEIGHTS_HELP
    from .validation import (PRECISION_CHOICES, cmap_arg, methods_arg, opacity_arg, positive_int_arg, targets_arg,
                             theta_arg)

    parser = argparse.ArgumentParser(
        prog="unioncam",
        description="Visual explanations of CNN decisions: UnionCAM (Hu et al. 2024) and CAM baselines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ex = sub.add_parser(
        "explain",
        help="explain images and write overlay PNGs and JSON details",
        description="For each IMAGE and method, write OUT/<name>.<method>.png (the map over the image) "
        "and OUT/<name>.<method>.json (class, score and the method's details).",
    )
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, …)")
    ex.add_argument("--method", type=methods_arg, default=["unioncam"],
                    help=f"method, a comma-separated list, or 'all' ({', '.join(METHODS)}); default unioncam")
    ex.add_argument("--target", type=targets_arg, default=None,
                    help="class index to explain (0–999 for ImageNet), or a comma-separated list of them "
                    "(files NAME.METHOD.classC.png, one per class, from one forward); default: the predicted class")
    ex.add_argument("--theta", type=theta_arg, default=10.0,
                    help="UnionCAM denoising percentile θ in [0, 100]; default 10 (the paper's)")
    ex.add_argument("--model", default=None, help=MODEL_HELP.format(factory=" or package.module:factory"))
    ex.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    ex.add_argument("--weights-seed", "--seed", dest="weights_seed", type=int, default=0,
                    help="seed of --weights random; default 0 (--seed is its old spelling)")
    ex.add_argument("--top-k", type=positive_int_arg, default=None,
                    help="explain the K most probable classes of each image (files NAME.METHOD.top1.png, …); "
                    "not with --target")
    ex.add_argument("--layer", default=None,
                    help="module name to explain; default the model's default_layer (vgg16: features.29, "
                    "the conv5_3 ReLU; see the README's Models table)")
    ex.add_argument("--image-size", "--size", dest="size", type=positive_int_arg, default=None,
                    help="resize images to SIZE×SIZE first; default the model's own: 64 for shapes, else 224")
    ex.add_argument("--batch-size", type=positive_int_arg, default=None,
                    help="masked inputs per forward pass; default 64 on CUDA, on a CPU 8 at 224² and up to 64 for smaller images")
    ex.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                    help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 (strict float32), "
                    "tf32 (CUDA), or bf16/fp16 for the masked forwards (autocast; scores stay float32); default auto")
    ex.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu; default cpu")
    ex.add_argument("--out", default="out", help="output folder; default ./out")
    ex.add_argument("--alpha", type=opacity_arg, default=0.5, help="overlay opacity of the map; default 0.5")
    ex.add_argument("--cmap", type=cmap_arg, default="jet", help="matplotlib colormap of the overlay; default jet")
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=_cmd_explain)
    for mod in _PLUGIN_MODULES:
        importlib.import_module(mod).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:  # InvalidInputError is a ValueError
        # A user's mistake, a missing file, an unreachable server: one sentence and status 2, no traceback.
        print(f"unioncam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unioncam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
