"""The one forward and head-only backward every method starts from, and the black-image score cache.

``forward_pass`` runs the model once over a batch of same-size images with the explained layer's
activation ``A`` captured as a leaf, picks each image's target, and (when asked) takes
``W = ∂ logit_c / ∂A`` with one backward through the head only: parameters never get gradients.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..validation import validate_target_list, validate_targets, validate_top_k

__all__ = ["Pass", "apply_reshape", "black_probs", "capture", "forward_pass", "frozen", "model_device", "model_dtype"]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter; float32 for a model with none."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters never get gradients: only the layer's activation does, so backward runs through the head."""
    flags = [(p, p.requires_grad) for p in model.parameters() if p.requires_grad]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def capture(module: nn.Module, name: str, need_grad: bool,
            tokens: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s output as ``A``; when ``need_grad``, as a leaf that the logits' graph starts from.

    ``tokens``: the output may have any shape (a ``reshape`` turns it into ``[N, C, h, w]`` afterwards);
    otherwise it must be ``[N, C, h, w]``.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or (out.dim() != 4 and not tokens):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidInputError("layer", f"{name!r} outputs {shape}",
                                    "a layer whose output is [N, C, h, w], or pass reshape= (a function that "
                                    "turns its output into [N, C, h, w], e.g. unioncam.models.vit_tokens_to_map)")
        a = out.detach()
        if need_grad:
            a.requires_grad_(True)
        store["A"] = a
        # A clone goes on, so that an in-place op after the layer (ReLU(inplace=True)) cannot touch A.
        return a.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def apply_reshape(reshape: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, name: str,
                  what: str = "activation") -> torch.Tensor:
    """``reshape(t)`` checked to be ``[N, C, h, w]`` with ``t``'s batch size; made contiguous."""
    out = reshape(t)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != t.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidInputError("reshape", f"turned layer {name!r}'s {what} {tuple(t.shape)} into {shape}",
                                f"a function returning [N, C, h, w] with N = {t.shape[0]}")
    return out.contiguous()


@dataclass
class Pass:
    """What one forward + backward over a batch of same-size images gives every method."""

    x: torch.Tensor  #: ``[B, 3, H, W]`` pixels
    targets: torch.Tensor  #: ``[B]`` long: the explained classes
    probs: torch.Tensor  #: ``[B, classes]`` float32 softmax
    acts: torch.Tensor  #: ``A``: ``[B, K, h, w]``
    grads: torch.Tensor | None  #: ``W = ∂ logit_c / ∂A``, ``[B, K, h, w]`` (``None`` without gradients)
    layer: str  #: the explained layer's name
    #: ``[B]`` long: which image of the call each row explains (``None``: row ``i`` is image ``i``). Several
    #: targets per image give several rows of one image (``x``, ``acts`` repeated; ``grads`` per target).
    image_index: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return (self.x.shape[-2], self.x.shape[-1])

    @property
    def scores(self) -> torch.Tensor:
        """``f_c(x)`` per image, float32 ``[B]``."""
        return self.probs.gather(1, self.targets[:, None]).squeeze(1)


def forward_pass(model: nn.Module, x: torch.Tensor, targets: Sequence[int | None | Sequence[int]],
                 layer: tuple[str, nn.Module], need_grad: bool,
                 reshape: Callable[[torch.Tensor], torch.Tensor] | None = None, top_k: int | None = None) -> Pass:
    """One forward over ``x`` with the layer captured; one head-only backward when ``need_grad``.

    ``targets``: one entry per image: a class, ``None`` → the arg-max class (the ``top_k`` classes when
    ``top_k`` is given), or a list of classes; checked against the model's class count. With one class
    per image the pass has one row per image; otherwise one row per (image, class), in image order then
    the entry's order (``Pass.image_index`` says which image), from the same single forward and one
    backward per target position.
    ``reshape``: turns the layer's raw output (tokens) into ``[N, C, h, w]``; it is applied to the
    captured activation and to its gradient alike, so it must only select and rearrange entries.
    """
    name, module = layer
    multi = top_k is not None or any(isinstance(c, (list, tuple)) for c in targets)
    with frozen(model), capture(module, name, need_grad, tokens=reshape is not None) as store, \
            torch.set_grad_enabled(need_grad):
        logits = model(x)
        if "A" not in store:
            raise InvalidInputError("layer", f"{name!r} did not run in the model's forward", "a layer on the forward path")
        probs = logits.detach().float().softmax(-1)
        if multi:
            return _multi_pass(x, logits, probs, store["A"], targets, top_k, name, need_grad, reshape)
        validate_targets(targets, probs.shape[1])
        t = probs.argmax(1)
        given = [(i, c) for i, c in enumerate(targets) if c is not None]
        if given:
            idx = torch.tensor([i for i, _ in given], device=x.device)
            t[idx] = torch.tensor([c for _, c in given], device=x.device)
        grads = None
        if need_grad:
            # Images are independent in eval mode, so one backward of the summed logits gives each its own W.
            (grads,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store["A"])
    acts = store["A"].detach()
    if reshape is not None:
        acts = apply_reshape(reshape, acts, name)
        grads = None if grads is None else apply_reshape(reshape, grads, name, "gradient")
    return Pass(x=x, targets=t, probs=probs, acts=acts, grads=grads, layer=name)


def _multi_pass(x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, raw: torch.Tensor,
                targets: Sequence[int | None | Sequence[int]], top_k: int | None, name: str, need_grad: bool,
                reshape: Callable[[torch.Tensor], torch.Tensor] | None) -> Pass:
    """The rows of several targets per image (see :func:`forward_pass`)."""
    num_classes = probs.shape[1]
    validate_top_k(top_k, num_classes)
    top = probs.topk(top_k or 1, dim=1).indices.tolist()
    per_image: list[list[int]] = []
    for i, c in enumerate(targets):
        if c is None:
            per_image.append(top[i])
        elif isinstance(c, (list, tuple)):
            per_image.append(validate_target_list(c, num_classes, f"targets[{i}]"))
        else:
            per_image.append([validate_targets([c], num_classes)[0]])
    rows = [(i, c) for i, cs in enumerate(per_image) for c in cs]
    dev = x.device
    img = torch.tensor([i for i, _ in rows], device=dev)
    t = torch.tensor([c for _, c in rows], device=dev)
    grads = None
    if need_grad:
        # One backward per target position j: the j-th target of every image at once (images are
        # independent in eval mode), so the head's backward runs max-targets times, not once per row.
        grads = torch.empty((len(rows), *raw.shape[1:]), device=dev, dtype=raw.dtype)
        J = max(len(cs) for cs in per_image)
        for j in range(J):
            r_idx, i_idx, c_idx = [], [], []
            r = 0
            for i, cs in enumerate(per_image):
                if j < len(cs):
                    r_idx.append(r + j)
                    i_idx.append(i)
                    c_idx.append(cs[j])
                r += len(cs)
            ii = torch.tensor(i_idx, device=dev)
            cc = torch.tensor(c_idx, device=dev)
            (g,) = torch.autograd.grad(logits[ii, cc].sum(), raw, retain_graph=j < J - 1)
            grads[torch.tensor(r_idx, device=dev)] = g[ii]
    acts = raw.detach()[img]
    if reshape is not None:
        acts = apply_reshape(reshape, acts, name)
        grads = None if grads is None else apply_reshape(reshape, grads, name, "gradient")
    return Pass(x=x[img], targets=t, probs=probs[img], acts=acts, grads=grads, layer=name, image_index=img)


_BLACK: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _model_state_key(model: nn.Module) -> tuple:
    # In-place updates (load_state_dict, optimiser steps) bump a tensor's version: the cache notices them.
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers())) + (model.training,)


def black_probs(model: nn.Module, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Softmax of the model on a black image of ``size``: ``b = f_c(0)`` for every ``c``, computed once."""
    per_model = _BLACK.setdefault(model, {})
    key = (tuple(size), str(device), dtype, _model_state_key(model))
    if key not in per_model:
        per_model.clear()  # an entry for old weights or another size is never used again
        with torch.no_grad():
            per_model[key] = model(torch.zeros(1, 3, *size, device=device, dtype=dtype)).float().softmax(-1)[0]
    return per_model[key]
