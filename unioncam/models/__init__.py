"""Models that take pixel input ``[N, 3, H, W]`` in ``[0, 1]``, and :func:`load_model` to get one by name."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import InvalidInputError
from .shapes import SHAPE_CLASSES, ShapesCNN, load_shapes_cnn
from .vgg import IMAGENET_MEAN, IMAGENET_STD, PixelVGG16, imagenet_categories, load_vgg16

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "SHAPE_CLASSES",
    "PixelVGG16",
    "ShapesCNN",
    "imagenet_categories",
    "load_model",
    "load_shapes_cnn",
    "load_vgg16",
]

#: The names :func:`load_model` knows besides ``package.module:factory``.
MODELS: tuple[str, ...] = ("vgg16", "shapes")


def load_model(name: str, weights: str | None = None, seed: int = 0,
               device: str | torch.device | None = None) -> nn.Module:
    """A pixel-space classifier in eval mode with frozen parameters, by name.

    ``vgg16`` (``weights``: ``imagenet`` (default), ``random`` or a path), ``shapes`` (the ground-truth
    benchmark's CNN; ``weights``: a path, default the shipped file) or ``package.module:factory``
    (called with no arguments; must return a pixel-space classifier, with ``default_layer`` or used
    with ``layer=``).
    """
    if name == "vgg16":
        return load_vgg16(weights or "imagenet", seed=seed, device=device)
    if name == "shapes":
        return load_shapes_cnn(weights, device=device)
    accepted = f"{', '.join(MODELS)} or package.module:factory"
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
