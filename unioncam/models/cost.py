"""What one forward of a model costs, and what its explained layer looks like, without building its weights.

The model is built on PyTorch's ``meta`` device (shapes only, no memory, no initialisation work) and run
once under :class:`torch.utils.flop_counter.FlopCounterMode`: the count is exact for the operations torch
knows (convolutions, matrix products, attention) and deterministic, so an archive's settings derived from
it are the same on every machine. The same forward shows whether the model takes that image size at all.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import InvalidInputError

__all__ = ["ModelCost", "default_image_size", "default_interpolation", "fits", "meta_model", "model_cost", "smallest_side"]


def default_image_size(name: str) -> int:
    """The image side a model's shipped or ImageNet weights were trained on: 64 for ``shapes``, a timm
    model's ``pretrained_cfg`` input size (its height), else 224."""
    from .timm_zoo import is_timm, timm_input_config

    if is_timm(name):
        return timm_input_config(name)["size"][0]
    return 64 if name == "shapes" else 224


def default_interpolation(name: str) -> str:
    """How images are resized for model ``name``: a timm model's ``pretrained_cfg`` interpolation, else bilinear."""
    from .timm_zoo import is_timm, timm_input_config

    return timm_input_config(name)["interpolation"] if is_timm(name) else "bilinear"


@dataclass(frozen=True)
class ModelCost:
    """One forward of ``model`` on one ``image_size``² image, and its explained layer."""

    model: str
    image_size: int
    gflops: float  #: floating-point operations of one forward, in 10⁹ (a multiply-add counts 2)
    layer: str  #: the explained layer (the argument, or the model's ``default_layer``)
    channels: int  #: the layer's channels: UnionCAM and Score-CAM run one masked forward per channel
    map_size: tuple[int, int]  #: the layer's ``(h, w)`` at this image size
    categories: tuple[str, ...]  #: the class names of the model's default weights


def meta_model(name: str) -> torch.nn.Module:
    """``load_model(name, "random")`` on the ``meta`` device: the architecture without any weights.

    A builder that computes with tensors itself (RegNet derives its widths with ``torch.arange``) cannot
    run there; such a model is built on the CPU (seeded random weights) and then moved to ``meta``.
    """
    from . import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # builders' notes on their initialisation schemes
        try:
            with torch.device("meta"):
                return load_model(name, "random")
        except (RuntimeError, NotImplementedError):
            return load_model(name, "random").to("meta")


def fits(model: torch.nn.Module, size: tuple[int, int]) -> bool:
    """Whether ``model`` runs on one ``size`` = ``(H, W)`` image, tried on the ``meta`` device.

    The forward runs with meta stand-ins of the model's parameters and buffers
    (:func:`torch.func.functional_call`), so it costs no memory and no arithmetic and leaves the model as
    it is. ``False`` for any failure, including one that has nothing to do with the size (an operation
    without a meta kernel): ask about a size known to work as well before concluding (:func:`smallest_side`).
    """
    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta") for k, v in
             [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    x = torch.zeros(1, 3, *size, device="meta")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            functional_call(model, state, (x,), strict=False, tie_weights=False)
    except Exception:  # noqa: BLE001 — a too-small image fails in the model's own way
        return False
    return True


def smallest_side(model: torch.nn.Module, largest: int = 1024) -> int | None:
    """The smallest ``s`` for which ``model`` takes an ``s``×``s`` image (bisection with :func:`fits`, which
    assumes that a model taking a size takes every larger one, as CNNs do); ``None`` when it does not even
    take ``largest``² (a fixed-size model, or one that cannot run on the meta device)."""
    if not fits(model, (largest, largest)):
        return None
    lo, hi = 0, largest  # lo fails (or is 0), hi fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(model, (mid, mid)) else (mid, hi)
    return hi


@functools.lru_cache(maxsize=64)
def model_cost(name: str, image_size: int, layer: str | None = None) -> ModelCost:
    """The cost of one forward of model ``name`` (a :data:`unioncam.models.MODELS` name) at ``image_size``².

    Raises:
        InvalidInputError: an unknown model or layer, or an image size the model cannot take (field
            ``image-size``; the message gives the model's own complaint).
    """
    from ..validation import resolve_layer

    model = meta_model(name)
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    layer_name, module = resolve_layer(model, layer)
    fixed = getattr(model, "input_size", None)
    if fixed is not None and (image_size, image_size) != tuple(fixed):
        raise InvalidInputError("image-size", f"{image_size} does not fit {name}", f"{fixed[0]} (its only input size)")
    seen: dict[str, torch.Tensor] = {}
    hook = module.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 — a too-small image fails in the model's own way
        hook.remove()  # it hands back the first output it saw: the probes below must not get it
        side = smallest_side(model)
        accepted = (f"at least {side} (the smallest size {name} takes)" if side is not None else "a larger size")
        raise InvalidInputError("image-size", f"{image_size} is too small for {name} ({type(exc).__name__}: "
                                f"{str(exc)[:160]})", f"{accepted}; {default_image_size(name)} is what its "
                                "weights were trained on") from None
    finally:
        hook.remove()
    out = seen["out"]
    reshape = model.layer_reshape(layer_name) if callable(getattr(model, "layer_reshape", None)) else None
    if reshape is not None:
        out = reshape(out)
    if out.dim() != 4:
        raise InvalidInputError("layer", f"{layer_name!r} outputs {tuple(out.shape)}", "a layer whose output is a map")
    return ModelCost(name, image_size, counter.get_total_flops() / 1e9, layer_name, int(out.shape[1]),
                     (int(out.shape[2]), int(out.shape[3])), tuple(getattr(model, "categories", ()) or ()))
