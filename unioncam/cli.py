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
_PLUGIN_MODULES: tuple[str, ...] = ("unioncam.serve.server", "unioncam.eval.evaluate", "unioncam.eval.figure")


def _cmd_explain(args: argparse.Namespace) -> int:
    from . import explain_batch, load_image
    from .models import load_model
    from .viz import overlay

    if args.top_k is not None and args.target is not None:
        raise ValueError("--top-k and --target exclude each other")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, names = [], []
    for path in args.images:  # read every image before the (slow) model load: a bad file fails at once
        images.append(load_image(path, size=args.size))
        names.append(Path(path).stem)
    model = load_model(args.model, args.weights, seed=args.seed, device=args.device)
    cats = getattr(model, "categories", None)
    for method in args.method:
        results = explain_batch(model, images, targets=[args.target] * len(images), method=method, theta=args.theta,
                                layer=args.layer, batch_size=args.batch_size, progress=not args.quiet,
                                precision=args.precision, top_k=args.top_k)
        if args.top_k is None:
            rows = [(name, f"{name}.{method}", img, res) for name, img, res in zip(names, images, results)]
        else:
            rows = [(name, f"{name}.{method}.top{r + 1}", img, res)
                    for name, img, per in zip(names, images, results) for r, res in enumerate(per)]
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
                "weights": args.weights,
                "size": list(res.saliency.shape),
                "details": res.details,
            }
            Path(f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
            label = f"{res.target} ({record['class_name']})" if cats else str(res.target)
            extra = f" selected={res.details['selected']}" if method == "unioncam" else ""
            print(f"{stem}.png  class {label}  p={res.score:.4f}{extra}  {res.details['seconds']:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .validation import PRECISION_CHOICES, methods_arg, theta_arg

    parser = argparse.ArgumentParser(
        prog="unioncam",
        description="Visual explanations of CNN decisions: UnionCAM (Hu et al. 2024) and CAM baselines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ex = sub.add_parser(
        "explain",
        help="explain images (VGG16 by default) and write overlay PNGs and JSON details",
        description="For each IMAGE and method, write OUT/<name>.<method>.png (the map over the image) "
        "and OUT/<name>.<method>.json (class, score and the method's details).",
    )
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, …)")
    ex.add_argument("--method", type=methods_arg, default=["unioncam"],
                    help=f"method, a comma-separated list, or 'all' ({', '.join(METHODS)}); default unioncam")
    ex.add_argument("--target", type=int, default=None,
                    help="class index to explain (0–999 for ImageNet); default: the predicted class")
    ex.add_argument("--theta", type=theta_arg, default=10.0,
                    help="UnionCAM denoising percentile θ in [0, 100]; default 10 (the paper's)")
    ex.add_argument("--model", default="vgg16",
                    help="vgg16 (default), shapes (the ground-truth benchmark's CNN), any torchvision "
                    "classifier by name (resnet50, densenet121, convnext_tiny, vit_b_16, swin_t, …) or "
                    "package.module:factory")
    ex.add_argument("--weights", default=None,
                    help="'imagenet' (torchvision's; cached under $TORCH_HOME or downloaded), a torchvision "
                    "weights name (e.g. IMAGENET1K_V2), 'random' (seeded, for trying things offline) or a path "
                    "to a state dict of that architecture; default imagenet (torchvision models) or the "
                    "shipped weights (shapes)")
    ex.add_argument("--seed", type=int, default=0, help="seed for --weights random; default 0")
    ex.add_argument("--top-k", type=int, default=None,
                    help="explain the K most probable classes of each image (files NAME.METHOD.top1.png, …); "
                    "not with --target")
    ex.add_argument("--layer", default=None,
                    help="module name to explain; default the model's default_layer (vgg16: features.29, "
                    "the conv5_3 ReLU; see the README's Models table)")
    ex.add_argument("--image-size", "--size", dest="size", type=int, default=224,
                    help="resize images to SIZE×SIZE first (the same option as serve's); default 224")
    ex.add_argument("--batch-size", type=int, default=None,
                    help="masked inputs per forward pass; default 64 on CUDA, on a CPU 8 at 224² and up to 64 for smaller images")
    ex.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                    help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 (strict float32), "
                    "tf32 (CUDA), or bf16/fp16 for the masked forwards (autocast; scores stay float32); default auto")
    ex.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu; default cpu")
    ex.add_argument("--out", default="out", help="output folder; default ./out")
    ex.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the map; default 0.5")
    ex.add_argument("--cmap", default="jet", help="matplotlib colormap of the overlay; default jet")
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
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # InvalidInputError is a ValueError
        print(f"unioncam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
