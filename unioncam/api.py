"""The public API: :func:`explain`, :func:`explain_batch` and their :class:`Explanation`.

They validate, group images by size, run the core's one forward/backward, hand the pass to the method,
and bring the results to the host once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from . import methods as _methods
from .core.capture import forward_pass, model_device, model_dtype
from .core.fast import FastPath, stats
from .core.progress import Progress, layer_channels
from .core.scorer import Scorer, backend_flags, default_batch_size, resolve_precision
from .errors import InvalidInputError
from .methods import METHODS, Options
from .validation import (
    resolve_layer,
    validate_batch_size,
    validate_image,
    validate_input_size,
    validate_method,
    validate_precision,
    validate_reshape,
    validate_target_entries,
    validate_theta,
    validate_top_k,
)

__all__ = ["METHODS", "Explanation", "Progress", "explain", "explain_batch", "job_rows", "prepare"]


@dataclass
class Explanation:
    """One explanation.

    Attributes:
        saliency: float32 ``[H, W]`` in ``[0, 1]``, on CPU.
        target: the explained class.
        score: softmax probability of ``target`` on the image.
        method: which method made it.
        details: what a user needs to trust it: the method's ``Details`` (a ``TypedDict``:
            :class:`~unioncam.methods.UnionCAMDetails` for UnionCAM — the β's, the black-image score, which
            map was selected, active channels, the share of gradient entries the threshold removed, θ —
            and ``layer``, ``channels``, ``masked_forwards``, ``seconds`` for every method).
    """

    saliency: torch.Tensor
    target: int
    score: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)


def explain_batch(
    model: nn.Module,
    images: Sequence[torch.Tensor | Image.Image],
    *,
    targets: Sequence[int | None | Sequence[int]] | None = None,
    method: str = "unioncam",
    theta: float = 10.0,
    layer: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | Progress = False,
    precision: str = "auto",
    keep_on_device: bool = False,
    top_k: int | None = None,
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fast: FastPath | dict[str, bool] | None = None,
) -> list[Explanation] | list[list[Explanation]]:
    """Explain several images at once; their masked inputs share chunks.

    Options as :func:`explain`, with ``images`` a sequence and ``targets`` one entry per image
    (``None`` → the arg-max class). Images of different sizes are processed in groups of equal size.
    ``keep_on_device``: leave each ``saliency`` on the model's device (for a caller that goes on
    computing with it there) instead of copying it to the CPU.

    Several targets per image: an entry of ``targets`` may be a list of classes, and ``top_k=k``
    explains the ``k`` most probable classes of every image whose entry is ``None``. Then the result is
    one list per image, holding one :class:`Explanation` per target in the entry's order (top-k: most
    probable first; an int entry gives a list of one). All targets of an image share its one forward;
    the gradients take one backward per target position; every masked input of every (image, target)
    is scored in the same chunks. With one int/``None`` per image and no ``top_k`` the result is the
    flat list of one :class:`Explanation` per image, as before.

    ``fast``: switches of the masked-forward fast path (:mod:`unioncam.core.fast`, ``docs/fast-path.md``)
    over the ``UNIONCAM_*`` environment variables; when any is on, ``details["fast_path"]`` names them.

    ``progress``: ``True`` draws a bar over this call's masked forwards (``n/total``, %, rate, ETA); a
    :class:`~unioncam.core.progress.Progress` made for a larger job (several calls: methods, image
    sets; :func:`job_rows`) counts this call's forwards into it and is left open.
    """
    method = validate_method(method)
    theta = validate_theta(theta)
    precision = validate_precision(precision)
    validate_batch_size(batch_size)  # before any work
    validate_top_k(top_k)
    reshape = validate_reshape(reshape)
    if isinstance(images, Image.Image) or (isinstance(images, torch.Tensor) and images.dim() != 4):
        raise InvalidInputError("images", "is a single image", "a list of images (use explain() for one)")
    images = list(images)
    targets = [None] * len(images) if targets is None else list(targets)
    if len(targets) != len(images):
        raise InvalidInputError("targets", f"has {len(targets)} entries for {len(images)} images", "one per image")
    pixels = [validate_image(im, f"images[{i}]" if len(images) > 1 else "image") for i, im in enumerate(images)]
    targets = validate_target_entries(targets)  # types now; the upper bound once the model's class count is known
    multi = top_k is not None or any(isinstance(t, list) for t in targets)
    layer_ref = resolve_layer(model, layer)
    for i, px in enumerate(pixels):
        validate_input_size(model, tuple(px.shape[-2:]), f"images[{i}]" if len(images) > 1 else "image")
    if reshape is None and callable(getattr(model, "layer_reshape", None)):
        reshape = model.layer_reshape(layer_ref[0])  # torchvision ViT / Swin tokens → [N, C, h, w]
    if device is not None:
        model.to(device)
    # Channels-last convolutions are faster on GPUs and CPUs alike (VGG16 on this project's 2-core CPU:
    # 162 vs 198 ms per 224² image). It changes the layout of the model's weights, not their values, and
    # is set before the gradient pass so that every forward of an explanation runs the same kernels.
    model.to(memory_format=torch.channels_last)
    dev, dtype = model_device(model), model_dtype(model)
    precision = resolve_precision(precision, dev)
    impl = _methods.get(method)
    options = Options(theta=theta)

    groups: dict[tuple[int, int], list[int]] = {}
    for i, px in enumerate(pixels):
        groups.setdefault(tuple(px.shape[-2:]), []).append(i)
    own = bar = None
    if isinstance(progress, Progress):
        bar = progress
    elif progress and impl.masked:
        bar = own = Progress([(impl, job_rows(targets, top_k))])
    if bar is not None and bar.total is None:
        # The total before the forward/backward starts: K from a meta-device forward (else from the pass).
        channels = layer_channels(model, layer_ref, next(iter(groups)), reshape)
        if channels is not None:
            bar.learn_channels(channels)
    results: list[Any] = [None] * len(images)
    try:
        scorer = Scorer(model, batch_size, bar, precision, fast=fast)
        with backend_flags(dev, precision):
            for size, idx in groups.items():
                scorer.batch_size = batch_size or default_batch_size(dev, size)
                x = torch.stack([pixels[i] for i in idx]).to(dev, dtype)
                try:
                    group = _explain_group(model, x, [targets[i] for i in idx], impl, options, layer_ref,
                                           scorer, keep_on_device, reshape, top_k, multi)
                except (RuntimeError, ValueError, AssertionError) as exc:
                    if isinstance(exc, InvalidInputError):
                        raise
                    # Only on failure (a meta forward of a large model costs ~0.1 s): was the image too small?
                    _refuse_too_small(model, size, f"images[{idx[0]}]" if len(images) > 1 else "image", exc)
                    raise
                for i, res in zip(idx, group):
                    results[i] = res
    finally:
        if own is not None:
            own.close()
    return results  # type: ignore[return-value]


def job_rows(targets: Sequence[int | None | Sequence[int]], top_k: int | None = None) -> int:
    """How many explanations (rows) a call of :func:`explain_batch` with these ``targets`` makes: one per
    image, one per class of a list entry, ``top_k`` per ``None`` entry when ``top_k`` is given."""
    return sum(len(t) if isinstance(t, (list, tuple)) else (top_k if t is None and top_k else 1) for t in targets)


def _refuse_too_small(model: nn.Module, size: tuple[int, int], name: str, exc: Exception) -> None:
    """Raise :class:`InvalidInputError` naming the smallest size ``model`` takes when ``size`` is below it
    (the cause of ``exc``); return when the size is not the problem."""
    from .models.cost import fits, smallest_side

    if fits(model, size):
        return
    side = smallest_side(model)
    if side is None or min(size) >= side:
        return  # the model does not run on the meta device, or fails there for another reason
    raise InvalidInputError(
        name, f"is {size[0]}×{size[1]}, too small for this model ({type(exc).__name__}: {str(exc)[:120]})",
        f"at least {side}×{side}, the smallest this model takes (resize it: --image-size {side} or more, "
        f"or load_image(path, size=...))") from exc


def _explain_group(model: nn.Module, x: torch.Tensor, targets: list[int | None], impl: _methods.Method,
                   options: Options, layer: tuple[str, nn.Module], scorer: Scorer,
                   keep_on_device: bool, reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   top_k: int | None = None, multi: bool = False) -> list[Any]:
    """One :class:`Explanation` per image, or (``multi``) one list of them per image."""
    start = time.perf_counter()
    bar = scorer.progress if isinstance(scorer.progress, Progress) else None
    if bar is not None:
        bar.phase(impl.name, "forward/backward")
    p = forward_pass(model, x, targets, layer, impl.needs_gradients, reshape=reshape, top_k=top_k)
    if bar is not None:
        bar.learn_channels(int(p.acts.shape[1]))  # where the meta device could not tell
        bar.phase(impl.name, "masked forwards")
    out = impl.run(p, scorer, options)
    # Results reach the host once, at the end (no sync per chunk or per channel).
    saliency = out.saliency.float() if keep_on_device else out.saliency.float().cpu()
    target_l = p.targets.tolist()
    score_l = p.scores.tolist()
    per_image = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in out.per_image.items()}
    per_image.setdefault("masked_forwards", 0)
    elapsed = time.perf_counter() - start
    B = p.x.shape[0]  # rows: one per image, or one per (image, target)
    results = []
    for b in range(B):
        mine = {k: (v[b] if isinstance(v, list) else v) for k, v in per_image.items()}
        details: dict[str, Any] = {"layer": p.layer, **impl.details(mine, options)}
        details["channels"] = int(p.acts.shape[1])
        details["precision"] = scorer.precision
        if scorer.fast.active:
            details["fast_path"] = [k for k, v in scorer.fast.as_dict().items() if v]
        details["seconds"] = elapsed / B
        results.append(Explanation(saliency[b], int(target_l[b]), float(score_l[b]), impl.name, details))
    if not multi:
        return results
    grouped: list[list[Explanation]] = [[] for _ in range(x.shape[0])]
    for i, res in zip(p.image_index.tolist(), results):
        grouped[i].append(res)
    return grouped


def explain(
    model: nn.Module,
    image: torch.Tensor | Image.Image,
    *,
    method: str = "unioncam",
    target: int | None = None,
    theta: float = 10.0,
    layer: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | Progress = False,
    precision: str = "auto",
    top_k: int | None = None,
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fast: FastPath | dict[str, bool] | None = None,
) -> Explanation | list[Explanation]:
    """Explain why ``model`` gives ``image`` the class ``target``.

    Args:
        model: a classifier taking pixel-space input ``[N, 3, H, W]`` in ``[0, 1]`` (see
            :func:`unioncam.load_vgg16`), in eval mode.
        image: float tensor ``[3, H, W]`` in ``[0, 1]``, or a PIL image (used at its own size).
        method: one of :data:`METHODS` (or a method registered with :func:`unioncam.methods.register`).
        target: class index; ``None`` → the model's arg-max class; a list of classes → a list of
            explanations, one per class, from one forward.
        theta: AMD percentile θ in ``[0, 100]`` (UnionCAM only).
        layer: name from ``model.named_modules()``; ``None`` → ``model.default_layer``.
        batch_size: masked inputs per forward pass; ``None`` → 64 on CUDA; on a CPU 8 at 224², up to
            64 for smaller images (:func:`unioncam.core.default_batch_size`; results do not depend on it
            beyond float rounding).
        device: move the model there first; ``None`` → where the model is.
        progress: show a progress bar over the masked forwards: ``n/total``, %, rate and ETA, from the
            moment the forward/backward starts (or a :class:`~unioncam.core.progress.Progress` to count into).
        precision: ``"auto"`` (the default: ``bf16`` on CUDA and on CPUs with native bf16 instructions,
            strict ``fp32`` elsewhere; :func:`unioncam.core.resolve_precision`), ``"fp32"`` (strict float32,
            TF32 off on CUDA), ``"tf32"`` (CUDA's TF32 matrix maths), ``"bf16"`` or ``"fp16"`` (autocast
            dtype of the masked forwards; the gradient pass, the model's head, every softmax and UnionCAM's
            three β forwards stay float32, so the selected map is strict fp32's and bf16 maps agree with
            strict fp32 ones to Pearson ≥ 0.999). ``details["precision"]`` names the one used.
        top_k: explain the ``k`` most probable classes (with ``target=None``): a list of ``k``
            explanations, most probable first.
        reshape: for a layer whose output is not ``[N, C, h, w]`` (a transformer's tokens): a function
            from its output to ``[N, C, h, w]`` that only selects and rearranges entries (it is applied
            to the activation and to its gradient alike), e.g. :func:`unioncam.models.vit_tokens_to_map`.
            Models from :func:`unioncam.load_model` (torchvision ViT and Swin) bring their own.
        fast: switches of the masked-forward fast path (``fixed_chunks``, ``pool_first``, ``compile``,
            ``cuda_graphs``; :mod:`unioncam.core.fast`): a dict of some of them, over the ``UNIONCAM_*``
            environment variables, over the device's defaults (all off). They change speed, not results
            beyond the precision's rounding (``docs/fast-path.md``).

    Returns:
        :class:`Explanation`, or a list of them for a list ``target`` or ``top_k``.

    Raises:
        InvalidInputError: a bad argument; the message names it and says what is accepted.
    """
    if isinstance(target, tuple):
        target = list(target)
    return explain_batch(model, [image], targets=[target], method=method, theta=theta, layer=layer,
                         batch_size=batch_size, device=device, progress=progress, precision=precision,
                         top_k=top_k, reshape=reshape, fast=fast)[0]


def prepare(
    model: nn.Module,
    size: tuple[int, int] | int = 224,
    *,
    method: str = "unioncam",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    fast: FastPath | dict[str, bool] | None = None,
) -> dict[str, Any]:
    """Warm the masked-forward path up for images of ``size`` before the first explanation.

    Runs one chunk of the masked forwards ``explain`` would run for ``method`` at ``size`` (zeros, the same
    chunk shape, precision and switches), so that a server's start-up, not its first request, pays for
    ``torch.compile``, CUDA-graph capture and cuDNN's autotuning. Cheap when the fast path is off.

    Returns ``{"seconds", "precision", "batch_size", "fast", "compile_s", "capture_s", ...}``: what was
    warmed and how long compile and capture took (:func:`unioncam.core.fast.stats`).
    """
    method = validate_method(method)
    precision = validate_precision(precision)
    validate_batch_size(batch_size)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if device is not None:
        model.to(device)
    model.to(memory_format=torch.channels_last)  # as explain_batch sets it
    dev = model_device(model)
    precision = resolve_precision(precision, dev)
    scorer = Scorer(model, batch_size, None, precision, fast=fast)
    scorer.batch_size = batch_size or default_batch_size(dev, hw)
    impl = _methods.get(method)
    start = time.perf_counter()
    if impl.masked:
        # The region map's chunks take normalised inputs where the model offers forward_normalized;
        # Group-CAM's take pixels.
        normalized = scorer.normalize is not None and method != "groupcam"
        bs = scorer.batch_size
        dtype = scorer.mask_dtype if normalized else model_dtype(model)
        targets = torch.zeros(bs, dtype=torch.long, device=dev)
        with backend_flags(dev, precision):
            scorer(bs, lambda i, j: torch.zeros((j - i, 3, *hw), device=dev, dtype=dtype), targets,
                   normalized=normalized)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return {"seconds": time.perf_counter() - start, "precision": precision, "batch_size": scorer.batch_size,
            "size": hw, "method": method, "fast": scorer.fast.as_dict(), **stats(model)}
