"""``unioncam figure``: a grid of overlays, images × methods, as one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["add_parser", "figure_grid"]


def figure_grid(
    model: nn.Module,
    images: list[torch.Tensor],
    methods: list[str],
    out: str | Path,
    targets: list[int | None] | None = None,
    masks: list[torch.Tensor | None] | None = None,
    theta: float = 10.0,
    layer: str | None = None,
    batch_size: int = 64,
    cell: float = 1.6,
    dpi: int = 80,
    row_labels: list[str] | None = None,
    progress: bool = False,
) -> Path:
    """Explain every image with every method and save a grid: one row per image, the input then a column
    per method. Object masks, when given, are outlined on the input. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..api import explain_batch
    from ..viz import overlay

    targets = targets or [None] * len(images)
    cats = getattr(model, "categories", None)
    maps = {
        m: explain_batch(model, images, targets=targets, method=m, theta=theta, layer=layer, batch_size=batch_size,
                         progress=progress)
        for m in methods
    }
    rows, cols = len(images), len(methods) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    for r, img in enumerate(images):
        ax = axes[r][0]
        ax.imshow(img.permute(1, 2, 0).numpy())
        if masks and masks[r] is not None:
            ax.contour(masks[r].float().numpy(), levels=[0.5], colors="white", linewidths=0.8)
        t = maps[methods[0]][r].target
        label = row_labels[r] if row_labels else (cats[t] if cats else str(t))
        ax.set_ylabel(label, fontsize=8)
        for c, m in enumerate(methods, start=1):
            res = maps[m][r]
            axes[r][c].imshow(overlay(img, res.saliency))
            if r == 0:
                axes[r][c].set_title(m, fontsize=9)
        if r == 0:
            axes[r][0].set_title("input", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _cmd(args: argparse.Namespace) -> int:
    from ..io import load_image
    from ..models import load_model
    from ..models.defaults import resolve_args

    if not args.shapes and not args.images:
        raise FileNotFoundError("give IMAGE files or --shapes N")
    resolve_args(args, "figure")
    model = load_model(args.model, args.weights, args.weights_seed, args.device)
    masks: list[Any] | None = None
    targets: list[int | None] | None = None
    labels = None
    if args.shapes:
        from .groundtruth import SHAPE_CLASSES, make_sample

        samples = [make_sample(args.shapes_seed, i, args.size) for i in range(args.shapes)]
        images = [s.image for s in samples]
        masks = [s.mask for s in samples]
        targets = [s.label for s in samples]
        with torch.no_grad():
            pred = model(torch.stack(images)).argmax(1).tolist()
        labels = [f"{SHAPE_CLASSES[s.label]} (pred. {SHAPE_CLASSES[p]})" for s, p in zip(samples, pred)]
    else:
        images = [load_image(p, size=args.size) for p in args.images]
    path = figure_grid(
        model,
        images,
        args.method,
        args.out,
        targets,
        masks,
        args.theta,
        args.layer,
        args.batch_size,
        row_labels=labels,
        progress=not args.quiet,
    )
    print(path)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``unioncam figure``."""
    from ..models.defaults import MODEL_HELP, WEIGHTS_HELP
    from ..validation import methods_arg, positive_int_arg, theta_arg

    p = subparsers.add_parser(
        "figure",
        help="a PNG grid of overlays: images × methods",
        description="Explain each image with each method; one row per image.",
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (or use --shapes)")
    p.add_argument("--shapes", type=int, default=0,
                   help="use the first N ground-truth benchmark images (synthetic shapes) instead")
    p.add_argument("--shapes-seed", type=int, default=1, help="their seed; default 1 (the held-out split)")
    p.add_argument("--method", type=methods_arg, default="all", help="methods, comma-separated, or 'all' (default)")
    p.add_argument("--model", default=None, help=MODEL_HELP.format(factory=" or package.module:factory"))
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--weights-seed", dest="weights_seed", type=int, default=0,
                   help="seed of --weights random; default 0")
    p.add_argument("--image-size", "--size", dest="size", type=positive_int_arg, default=None,
                   help="image side; default the model's own: 64 for shapes, else 224")
    p.add_argument("--theta", type=theta_arg, default=10.0, help="UnionCAM θ in [0, 100]; default 10")
    p.add_argument("--layer", default=None, help="layer to explain; default the model's default_layer")
    p.add_argument("--batch-size", type=positive_int_arg, default=64, help="masked inputs per forward pass; default 64")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu; default cpu")
    p.add_argument("--out", default="figure.png", help="PNG path; default ./figure.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
