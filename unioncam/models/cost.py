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

__all__ = ["ModelCost", "meta_model", "model_cost"]


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
        raise InvalidInputError("image-size", f"{image_size} is too small for {name} ({type(exc).__name__}: "
                                f"{str(exc)[:160]})", "a larger size (224 is what the weights were trained on)") from None
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
