"""Models that take pixel input ``[N, 3, H, W]`` in ``[0, 1]``, and :func:`load_model` to get one by name."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import InvalidInputError
from .cost import ModelCost, model_cost
from .shapes import SHAPE_CLASSES, ShapesCNN, load_shapes_cnn
from .timm_zoo import is_timm, load_timm
from .vgg import IMAGENET_MEAN, IMAGENET_STD, PixelVGG16, imagenet_categories, load_vgg16
from .zoo import (
    TORCHVISION_MODELS,
    default_layer_of,
    load_torchvision,
    nhwc_to_nchw,
    pixel_model,
    vit_tokens_to_map,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "ModelCost",
    "SHAPE_CLASSES",
    "TORCHVISION_MODELS",
    "PixelVGG16",
    "ShapesCNN",
    "default_layer_of",
    "imagenet_categories",
    "is_known_model",
    "is_timm",
    "load_model",
    "load_shapes_cnn",
    "load_timm",
    "load_torchvision",
    "load_vgg16",
    "model_cost",
    "nhwc_to_nchw",
    "pixel_model",
    "vit_tokens_to_map",
]

#: The names :func:`load_model` knows besides ``package.module:factory``: ``vgg16`` (:class:`PixelVGG16`),
#: ``shapes`` and every torchvision classifier. Besides them, ``timm/<name>`` takes any timm model
#: (:func:`is_known_model`).
MODELS: tuple[str, ...] = ("vgg16", "shapes", *(n for n in TORCHVISION_MODELS if n != "vgg16"))


def is_known_model(name: object) -> bool:
    """Whether ``name`` is one of :data:`MODELS` or a ``timm/<name>`` (its existence is checked on loading)."""
    return isinstance(name, str) and (name in MODELS or is_timm(name))


def load_model(name: str, weights: str | None = None, seed: int = 0,
               device: str | torch.device | None = None) -> nn.Module:
    """A pixel-space classifier in eval mode with frozen parameters, by name.

    ``vgg16`` (:class:`PixelVGG16`; ``weights``: ``imagenet`` (default), ``random`` or a path), ``shapes``
    (the ground-truth benchmark's CNN; ``weights``: a path or ``random``, default ``shipped``: the file
    in the package), any other
    torchvision classifier by its torchvision name (``resnet50``, ``vit_b_16``, ``swin_t``, …: see
    :func:`unioncam.models.load_torchvision`; ``weights``: ``imagenet`` (default), a torchvision weights
    name, ``random`` or a path) or ``package.module:factory`` (called with no arguments; must return a
    pixel-space classifier, with ``default_layer`` or used with ``layer=``).
    """
    if name == "vgg16":
        return load_vgg16(weights or "imagenet", seed=seed, device=device)
    if name == "shapes":
        return load_shapes_cnn(None if weights == "shipped" else weights, device=device, seed=seed)
    if isinstance(name, str) and name in TORCHVISION_MODELS:
        return load_torchvision(name, weights or "imagenet", seed=seed, device=device)
    if is_timm(name):
        return load_timm(name, weights or "imagenet", seed=seed, device=device)
    accepted = ("vgg16, shapes, a torchvision classifier name (resnet50, vit_b_16, …), timm/<name> (a timm model) "
                "or package.module:factory")
    if isinstance(name, str) and ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidInputError("model", f"{name!r} cannot be imported ({exc})", accepted) from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise InvalidInputError("model", f"{name!r} returned a {type(model).__name__}", "a torch.nn.Module")
        model.eval().requires_grad_(False)
        return model.to(device) if device is not None else model
    raise InvalidInputError("model", f"{name!r}", accepted)
