"""Faithfulness and localisation metrics of saliency maps (the spec's "Metrics" section).

Conventions shared by every function here:

* ``images``: float ``[N, 3, H, W]`` (or a sequence of ``[3, H, W]``) in pixel space ``[0, 1]``;
  ``saliencies``: ``[N, H, W]`` (or a sequence of ``[H, W]``), any non-negative scale; ``targets``:
  class indices (``None`` → the model's arg-max class on the image).
* Scores are ``f_c(z) = softmax(model(z))[c]`` in float32, computed in chunks of ``batch_size`` on the
  model's device; nothing goes through numpy.
* ``per_image=False`` (default) gives the mean as a float; ``per_image=True`` gives a float32 CPU
  tensor ``[N]`` of per-image values, whose mean is the default result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from ..core.capture import model_device
from ..core.scorer import Scorer
from ..errors import InvalidInputError

__all__ = [
    "INSERTION_BLUR",
    "average_drop",
    "average_increase",
    "deletion_auc",
    "drop_and_increase",
    "energy_pointing_game",
    "insertion_auc",
    "insertion_deletion_curves",
    "pointing_game",
    "region_mask",
    "target_scores",
]

#: Insertion's starting image: a Gaussian blur with kernel 11 and σ = 5 (Petsiuk et al.'s code), reflect
#: padding (torchvision's ``gaussian_blur``); the kernel shrinks to fit images smaller than 11 pixels.
INSERTION_BLUR: tuple[int, float] = (11, 5.0)

Region = torch.Tensor | Sequence[float] | Sequence[Sequence[float]]


# ------------------------------------------------------------------------------------------ inputs


def _images(images: Any) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        x = images if images.dim() == 4 else None
    else:
        try:
            x = torch.stack(list(images))
        except (TypeError, RuntimeError):
            x = None
    if x is None or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(
            "images", f"is {got}", "float [N, 3, H, W] or a list of [3, H, W] of one size, in [0, 1]"
        )
    return x


def _saliencies(saliencies: Any, n: int, size: tuple[int, int]) -> torch.Tensor:
    s = (
        saliencies
        if isinstance(saliencies, torch.Tensor)
        else torch.stack([torch.as_tensor(m) for m in saliencies])
    )
    if s.dim() == 2:
        s = s[None]
    if s.shape != (n, *size):
        raise InvalidInputError(
            "saliencies", f"has shape {tuple(s.shape)}", f"[N, H, W] = {[n, *size]}, one per image"
        )
    if not bool(torch.isfinite(s).all()):
        raise InvalidInputError("saliencies", "has NaN or infinite values", "finite maps")
    return s.float()


def _targets(model: nn.Module, x: torch.Tensor, targets: Any, batch_size: int) -> torch.Tensor:
    n = x.shape[0]
    if targets is None:
        targets = [None] * n
    elif isinstance(targets, torch.Tensor):
        targets = targets.flatten().tolist()
    elif isinstance(targets, int):
        targets = [targets]
    targets = list(targets)
    if len(targets) != n:
        raise InvalidInputError(
            "targets", f"has {len(targets)} entries for {n} images", "one class index (or None) per image"
        )
    if any(t is None for t in targets):
        with torch.no_grad():
            pred = torch.cat(
                [
                    model(x[i : i + batch_size].to(model_device(model))).argmax(1).cpu()
                    for i in range(0, n, batch_size)
                ]
            ).tolist()
        targets = [p if t is None else t for t, p in zip(targets, pred)]
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InvalidInputError("targets", f"{t!r} is not a class index", "non-negative integers or None")
    return torch.tensor(targets, dtype=torch.long)


def target_scores(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """``softmax(model(inputs))[targets]`` in float32 on the model's device, ``batch_size`` inputs at a time.

    The engine's scorer does the work (the same chunking and out-of-memory back-off as explanations).
    """
    return Scorer(model, batch_size).images(inputs, targets)


def _reduce(values: torch.Tensor, per_image: bool) -> torch.Tensor | float:
    values = values.float().cpu()
    return values if per_image else float(values.mean())


# ------------------------------------------------------------------- Average Drop / Increase


def drop_and_increase(
    model: nn.Module,
    images: Any,
    saliencies: Any,
    targets: Any = None,
    batch_size: int = 64,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Average Drop and Average Increase (percent, float32 CPU ``[N]`` each) from one scoring pass.

    ``y_c = f_c(x)``, ``o_c = f_c(x ⊙ map)`` (the map multiplies the pixels, so it should lie in
    ``[0, 1]``). Drop: ``100 · max(0, y_c − o_c) / y_c``, 0 where ``y_c`` underflows to 0 in float32
    (nothing can drop); Increase: ``100 · 1[y_c < o_c]``. ``scores``: ``y_c`` when already known (an
    explanation's ``score``), which saves the forwards of the unmasked images.
    """
    x = _images(images)
    s = _saliencies(saliencies, x.shape[0], tuple(x.shape[-2:]))
    t = _targets(model, x, targets, batch_size)
    scorer = Scorer(model, batch_size)
    xd, sd, td = x.to(scorer.device), s.to(scorer.device), t.to(scorer.device)
    y = scorer.images(xd, td) if scores is None else torch.as_tensor(scores, dtype=torch.float32).to(scorer.device)
    o = scorer.masked(xd, sd, td)
    drop = torch.where(y > 0, (y - o).clamp_min(0) / torch.where(y > 0, y, 1), 0)
    return (100.0 * drop).float().cpu(), (100.0 * (y < o).float()).cpu()


def average_drop(
    model: nn.Module,
    images: Any,
    saliencies: Any,
    targets: Any = None,
    batch_size: int = 64,
    per_image: bool = False,
) -> torch.Tensor | float:
    """Average Drop in percent: ``100/N · Σ max(0, y_c − o_c) / y_c`` (lower is better).

    See :func:`drop_and_increase`, which gives it together with Average Increase from one pass.
    """
    return _reduce(drop_and_increase(model, images, saliencies, targets, batch_size)[0], per_image)


def average_increase(
    model: nn.Module,
    images: Any,
    saliencies: Any,
    targets: Any = None,
    batch_size: int = 64,
    per_image: bool = False,
) -> torch.Tensor | float:
    """Average Increase in percent: ``100/N · Σ 1[y_c < o_c]`` (higher is better); per image 0 or 100."""
    return _reduce(drop_and_increase(model, images, saliencies, targets, batch_size)[1], per_image)


# ------------------------------------------------------------------------ Insertion / Deletion


def _blur(x: torch.Tensor) -> torch.Tensor:
    k, sigma = INSERTION_BLUR
    k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # reflect padding needs kernel // 2 < side
    return gaussian_blur(x, [k, k], [sigma, sigma]) if k >= 3 else x


def insertion_deletion_curves(
    model: nn.Module,
    images: Any,
    saliencies: Any,
    targets: Any = None,
    mode: str = "deletion",
    pixels_per_step: int = 224,
    batch_size: int = 64,
    start: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Probability curves of Petsiuk et al. (2018), float32 CPU ``[N, steps + 1]``.

    Pixels are ranked by the map, highest first (ties: row-major order, a stable sort). With
    ``n = H·W`` and ``steps = ⌈n / pixels_per_step⌉``, point ``k`` (``k = 0 … steps``) is the score
    ``f_c`` of the image with its first ``min(k · pixels_per_step, n)`` ranked pixels changed:
    ``"deletion"`` sets them to black (0), starting from the image; ``"insertion"`` copies them from the
    image into the start image, by default the image blurred as :data:`INSERTION_BLUR` says. ``start``
    replaces that blur (a function of the ``[N, 3, H, W]`` images), e.g. for tests.
    """
    if mode not in ("deletion", "insertion"):
        raise InvalidInputError("mode", f"{mode!r}", "'deletion' or 'insertion'")
    if isinstance(pixels_per_step, bool) or not isinstance(pixels_per_step, int) or pixels_per_step < 1:
        raise InvalidInputError("pixels_per_step", f"{pixels_per_step!r}", "an integer ≥ 1")
    x = _images(images)
    N, _, H, W = x.shape
    s = _saliencies(saliencies, N, (H, W))
    t = _targets(model, x, targets, batch_size)
    scorer = Scorer(model, batch_size)
    dev = scorer.device
    x, s, t = x.to(dev), s.to(dev), t.to(dev)
    n = H * W
    steps = math.ceil(n / pixels_per_step)
    order = torch.sort(s.flatten(1), dim=1, descending=True, stable=True).indices  # [N, n]
    # rank[b, p] = position of pixel p in image b's order; pixel p is changed at step k iff rank < k·pps.
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=dev).expand(N, n))
    rank = rank.view(N, 1, H, W)
    if mode == "deletion":
        base, fill = x, torch.zeros_like(x)
    else:
        base, fill = (start(x) if start is not None else _blur(x)).to(x.dtype), x
    flat_idx = torch.arange(N * (steps + 1), device=dev)
    img_of, k_of = flat_idx // (steps + 1), flat_idx % (steps + 1)

    def build(i: int, j: int) -> torch.Tensor:
        b, k = img_of[i:j], k_of[i:j]
        changed = rank[b] < (k * pixels_per_step).view(-1, 1, 1, 1)
        return torch.where(changed, fill[b], base[b])

    scores = scorer(flat_idx.numel(), build, t[img_of])
    return scores.view(N, steps + 1).cpu()


def _auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under curves sampled at ``x = k / steps``, ``x ∈ [0, 1]``."""
    steps = curves.shape[1] - 1
    return (curves.sum(1) - (curves[:, 0] + curves[:, -1]) / 2) / steps


def deletion_auc(
    model: nn.Module,
    images: Any,
    saliencies: Any,
    targets: Any = None,
    pixels_per_step: int = 224,
    batch_size: int = 64,
    per_image: bool = False,
) -> torch.Tensor | float:
    """Area under the deletion curve (lower is better); see :func:`insertion_deletion_curves`."""
    curves = insertion_deletion_curves(
        model, images, saliencies, targets, "deletion", pixels_per_step, batch_size
    )
    return _reduce(_auc(curves), per_image)


def insertion_auc(
    model: nn.Module,
    images: Any,
    saliencies: Any,
    targets: Any = None,
    pixels_per_step: int = 224,
    batch_size: int = 64,
    per_image: bool = False,
    start: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | float:
    """Area under the insertion curve from the blurred image (higher is better); see
    :func:`insertion_deletion_curves`."""
    curves = insertion_deletion_curves(
        model, images, saliencies, targets, "insertion", pixels_per_step, batch_size, start=start
    )
    return _reduce(_auc(curves), per_image)


# ---------------------------------------------------------------------------------- localisation


def region_mask(region: Region, size: tuple[int, int]) -> torch.Tensor:
    """A boolean ``[H, W]`` mask from a mask, a box ``(x0, y0, x1, y1)`` or a list of boxes (their union).

    Boxes are in pixels with ``x1``, ``y1`` exclusive (slicing convention: ``(0, 0, W, H)`` is the whole
    image); they are clipped to the image. Pascal VOC's 1-based inclusive ``xmin … xmax`` is
    ``(xmin − 1, ymin − 1, xmax, ymax)``.
    """
    H, W = size
    if isinstance(region, torch.Tensor) and region.dim() == 2:
        if tuple(region.shape) != (H, W):
            raise InvalidInputError(
                "mask", f"has shape {tuple(region.shape)}", f"the saliency's shape {[H, W]}"
            )
        return region.bool()
    boxes = region.tolist() if isinstance(region, torch.Tensor) else region
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes]
    mask = torch.zeros(H, W, dtype=torch.bool)
    for box in boxes:
        if (
            len(box) != 4
            or not all(isinstance(v, (int, float)) for v in box)
            or box[2] <= box[0]
            or box[3] <= box[1]
        ):
            raise InvalidInputError(
                "box",
                f"{box!r} is not a box",
                "(x0, y0, x1, y1) with x1 > x0, y1 > y0, or a boolean mask [H, W]",
            )
        x0, y0, x1, y1 = (round(v) for v in box)
        mask[max(0, y0) : max(0, min(H, y1)), max(0, x0) : max(0, min(W, x1))] = True
    return mask


def _maps_regions(saliency: Any, regions: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    s = torch.as_tensor(saliency).float().cpu()
    single = s.dim() == 2
    if single:
        s, regions = s[None], [regions]
    if s.dim() != 3:
        raise InvalidInputError("saliency", f"has shape {tuple(s.shape)}", "[H, W] or [N, H, W]")
    if len(regions) != s.shape[0]:
        raise InvalidInputError(
            "mask_or_box", f"has {len(regions)} entries for {s.shape[0]} maps", "one per map"
        )
    m = torch.stack([region_mask(r, tuple(s.shape[-2:])).cpu() for r in regions])
    return s, m, single


def pointing_game(saliency: Any, mask_or_box: Any, per_image: bool = False) -> torch.Tensor | float:
    """Pointing game (Zhang et al. 2018) without tolerance: 1 if the map's maximum lies in the object.

    A map whose maximum is reached at several pixels counts as a hit only if all of them lie inside, so
    a constant map hits only a region that covers the whole image. ``saliency`` is ``[H, W]`` with one
    region, or ``[N, H, W]`` with a sequence of regions (see :func:`region_mask`). Result in ``[0, 1]``.
    """
    s, m, single = _maps_regions(saliency, mask_or_box)
    peak = s == s.flatten(1).amax(1).view(-1, 1, 1)
    hits = (peak & ~m).flatten(1).any(1).logical_not().float()
    return float(hits[0]) if single and not per_image else _reduce(hits, per_image)


def energy_pointing_game(saliency: Any, mask_or_box: Any, per_image: bool = False) -> torch.Tensor | float:
    """Energy-based pointing game (Wang et al. 2020): ``Σ_{in region} map / Σ map`` of the (relu'd) map.

    A map that sums to 0 scores 0. Same arguments as :func:`pointing_game`; result in ``[0, 1]``.
    """
    s, m, single = _maps_regions(saliency, mask_or_box)
    s = s.clamp_min(0)
    total = s.flatten(1).sum(1)
    inside = (s * m).flatten(1).sum(1)
    share = torch.where(total > 0, inside / torch.where(total > 0, total, 1), 0)
    return float(share[0]) if single and not per_image else _reduce(share, per_image)
