"""The one forward and head-only backward every method starts from, and the black-image score cache.

``forward_pass`` runs the model once over a batch of same-size images with the explained layer's
activation ``A`` captured as a leaf, picks each image's target, and (when asked) takes
``W = ∂ logit_c / ∂A`` with one backward through the head only: parameters never get gradients.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..validation import validate_targets

__all__ = ["Pass", "black_probs", "capture", "forward_pass", "frozen", "model_device", "model_dtype"]


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
def capture(module: nn.Module, name: str, need_grad: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s output as ``A``; when ``need_grad``, as a leaf that the logits' graph starts from."""
    store: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidInputError("layer", f"{name!r} outputs {shape}", "a layer whose output is [N, C, h, w]")
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


@dataclass
class Pass:
    """What one forward + backward over a batch of same-size images gives every method."""

    x: torch.Tensor  #: ``[B, 3, H, W]`` pixels
    targets: torch.Tensor  #: ``[B]`` long: the explained classes
    probs: torch.Tensor  #: ``[B, classes]`` float32 softmax
    acts: torch.Tensor  #: ``A``: ``[B, K, h, w]``
    grads: torch.Tensor | None  #: ``W = ∂ logit_c / ∂A``, ``[B, K, h, w]`` (``None`` without gradients)
    layer: str  #: the explained layer's name

    @property
    def size(self) -> tuple[int, int]:
        return (self.x.shape[-2], self.x.shape[-1])

    @property
    def scores(self) -> torch.Tensor:
        """``f_c(x)`` per image, float32 ``[B]``."""
        return self.probs.gather(1, self.targets[:, None]).squeeze(1)


def forward_pass(model: nn.Module, x: torch.Tensor, targets: Sequence[int | None],
                 layer: tuple[str, nn.Module], need_grad: bool) -> Pass:
    """One forward over ``x`` with the layer captured; one head-only backward when ``need_grad``.

    ``targets``: one class per image, ``None`` → the arg-max class; checked against the model's class count.
    """
    name, module = layer
    with frozen(model), capture(module, name, need_grad) as store, torch.set_grad_enabled(need_grad):
        logits = model(x)
        if "A" not in store:
            raise InvalidInputError("layer", f"{name!r} did not run in the model's forward", "a layer on the forward path")
        probs = logits.detach().float().softmax(-1)
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
    return Pass(x=x, targets=t, probs=probs, acts=store["A"].detach(), grads=grads, layer=name)


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
