"""Every check of a user's argument, in one place: the API, the command line and the server use these.

Each ``validate_*`` returns the value in its canonical form or raises :class:`InvalidInputError` naming
the input, what was wrong and what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from .errors import InvalidInputError
from .io import to_pixels

__all__ = [
    "PRECISIONS",
    "PRECISION_CHOICES",
    "resolve_layer",
    "validate_batch_size",
    "validate_image",
    "validate_method",
    "validate_precision",
    "validate_target",
    "validate_targets",
    "validate_theta",
    "validate_input_size",
    "validate_reshape",
    "validate_target_entries",
    "validate_target_list",
    "validate_top_k",
]

#: ``precision`` → the dtype of the masked forwards (``None``: float32). ``fp32`` is strict float32 on
#: every device (TF32 off); ``tf32`` lets CUDA's matrix units round inputs to TF32 (10-bit mantissa).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "tf32": None, "bf16": torch.bfloat16,
                                            "fp16": torch.float16}

#: What ``precision`` may be: a name of :data:`PRECISIONS`, or ``"auto"`` (the default) — bf16 on CUDA and on
#: CPUs with native bf16 instructions, strict fp32 elsewhere (:func:`unioncam.core.resolve_precision`).
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)


def validate_method(method: Any) -> str:
    """A registered method's name, lower-cased (:data:`unioncam.METHODS` and any registered since)."""
    from .methods import registry  # the registry sits above this module

    names = registry()
    if not isinstance(method, str) or method.strip().lower() not in names:
        raise InvalidInputError("method", f"{method!r} is not a known method", ", ".join(names))
    return method.strip().lower()


def validate_theta(theta: Any) -> float:
    """UnionCAM's percentile θ: a finite number in ``[0, 100]``."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta):
        raise InvalidInputError("theta", f"{theta!r} is not a finite number", "a number in [0, 100]")
    if not 0.0 <= float(theta) <= 100.0:
        raise InvalidInputError("theta", f"{theta!r} is outside [0, 100]", "a number in [0, 100]")
    return float(theta)


def validate_precision(precision: Any) -> str:
    """One of :data:`PRECISION_CHOICES` (``"auto"`` or a name of :data:`PRECISIONS`), lower-cased."""
    if not isinstance(precision, str) or precision.lower() not in PRECISION_CHOICES:
        raise InvalidInputError("precision", f"{precision!r} is not a known precision",
                                ", ".join(PRECISION_CHOICES))
    return precision.lower()


def validate_batch_size(batch_size: Any) -> int | None:
    """Masked inputs per forward: an integer ≥ 1, or ``None`` for the device's default."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError("batch_size", f"{batch_size!r}", "an integer ≥ 1, or None for the device's default")
    return batch_size


def validate_image(image: Any, name: str = "image") -> torch.Tensor:
    """A float ``[3, H, W]`` tensor in ``[0, 1]`` (a PIL image is converted at its own size)."""
    if isinstance(image, Image.Image):
        return to_pixels(image.convert("RGB"), size=None)
    if not isinstance(image, torch.Tensor):
        raise InvalidInputError(
            name, f"is a {type(image).__name__}", "a float tensor [3, H, W] in [0, 1] or a PIL image"
        )
    if image.dim() != 3 or image.shape[0] != 3:
        raise InvalidInputError(name, f"has shape {tuple(image.shape)}", "a float tensor [3, H, W] in [0, 1]")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise InvalidInputError(name, f"has shape {tuple(image.shape)}", "H, W ≥ 1")
    if not image.is_floating_point():
        raise InvalidInputError(name, f"has dtype {image.dtype}", "float pixels in [0, 1] (divide uint8 by 255)")
    if not bool(torch.isfinite(image).all()):
        raise InvalidInputError(name, "has NaN or infinite values", "finite pixels in [0, 1]")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(
            name, f"has values in [{lo:g}, {hi:g}]", "pixels in [0, 1] (pixel space, not ImageNet-normalised)"
        )
    return image


def validate_target(target: Any, num_classes: int | None = None, field: str = "target") -> int | None:
    """A class index in ``[0, num_classes)`` (any non-negative one when the count is unknown), or ``None``."""
    if target is None:
        return None
    accepted = "an integer class index" if num_classes is None else f"an integer in [0, {num_classes - 1}]"
    if isinstance(target, bool) or not isinstance(target, int):
        raise InvalidInputError(field, f"{target!r} is not a class index", accepted)
    if target < 0 or (num_classes is not None and target >= num_classes):
        raise InvalidInputError(field, f"{target} is out of range", accepted)
    return target


def validate_targets(targets: Sequence[Any], num_classes: int | None = None) -> list[int | None]:
    """:func:`validate_target` of each entry."""
    return [validate_target(t, num_classes) for t in targets]


def validate_target_list(targets: Any, num_classes: int | None = None, field: str = "targets") -> list[int]:
    """A non-empty list of class indices (each as :func:`validate_target`) for one image."""
    if not isinstance(targets, (list, tuple)) or len(targets) == 0:
        raise InvalidInputError(field, f"{targets!r} is not a non-empty list of classes",
                                "a class index, None, or a non-empty list of class indices")
    return [validate_target(t, num_classes, field) for t in targets]  # type: ignore[misc]


def validate_target_entries(targets: Sequence[Any], num_classes: int | None = None) -> list[Any]:
    """One entry per image: a class index, ``None`` or a non-empty list of class indices."""
    return [validate_target_list(t, num_classes, f"targets[{i}]") if isinstance(t, (list, tuple))
            else validate_target(t, num_classes) for i, t in enumerate(targets)]


def validate_top_k(top_k: Any, num_classes: int | None = None) -> int | None:
    """How many top classes to explain per image: an integer in ``[1, num_classes]``, or ``None``."""
    if top_k is None:
        return None
    accepted = "an integer ≥ 1" if num_classes is None else f"an integer in [1, {num_classes}]"
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1 or (
            num_classes is not None and top_k > num_classes):
        raise InvalidInputError("top_k", f"{top_k!r}", accepted)
    return top_k


def validate_reshape(reshape: Any) -> Any:
    """``reshape``: ``None`` or a callable turning a layer's output into ``[N, C, h, w]``."""
    if reshape is not None and not callable(reshape):
        raise InvalidInputError("reshape", f"is a {type(reshape).__name__}",
                                "None or a function from the layer's output to [N, C, h, w]")
    return reshape


def validate_input_size(model: nn.Module, size: tuple[int, int], name: str = "image") -> None:
    """Images of a model with a fixed ``input_size`` (torchvision's ViTs) must have that size."""
    fixed = getattr(model, "input_size", None)
    if fixed is not None and tuple(size) != tuple(fixed):
        side = fixed[0]
        raise InvalidInputError(name, f"is {size[0]}×{size[1]}", f"{fixed[0]}×{fixed[1]} for this model "
                                f"(resize it: --size {side}, or load_image(path, size={side}))")


def default_layer(model: nn.Module) -> str:
    """The layer explained when none is named: the model's ``default_layer`` attribute."""
    name = getattr(model, "default_layer", None)
    if not name:
        raise InvalidInputError(
            "layer", "is not given and the model has no default_layer attribute",
            "layer=<name> (one of model.named_modules())",
        )
    return name


def resolve_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the explained layer: ``layer`` or the model's ``default_layer``."""
    name = default_layer(model) if layer is None else layer
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or name == "":
        some = list(getattr(model, "layer_candidates", None) or [n for n in modules if n][-8:])
        raise InvalidInputError(
            "layer", f"{name!r} is not a module of this model", f"a name from model.named_modules(), e.g. {some}"
        )
    return name, modules[name]


# ------------------------------------------------------------------- argparse types (the same checks)


def methods_arg(text: str) -> list[str]:
    """``--method``: comma-separated method names, or ``all``."""
    import argparse

    from .methods import registry

    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if names == ["all"]:
        return list(registry())
    try:
        if not names:
            raise InvalidInputError("method", f"{text!r} names no method", ", ".join(registry()))
        return [validate_method(m) for m in names]
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem}; accepted: {exc.accepted}, all") from None


def theta_arg(text: str) -> float:
    """``--theta``: a number in ``[0, 100]``."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; accepted: a number in [0, 100]") from None
    try:
        return validate_theta(value)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem}; accepted: {exc.accepted}") from None


def targets_arg(text: str) -> int | list[int]:
    """``--target``: a class index, or a comma-separated list of them (one explanation per class)."""
    import argparse

    parts = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a class index; accepted: an integer ≥ 0 or a "
                                         "comma-separated list of them, e.g. 281,285") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} has a negative class; accepted: integers ≥ 0")
    return values[0] if len(values) == 1 else values


def _int_arg(text: str, low: int, high: int | None, accepted: str, kind: str) -> int:
    """``text`` as an integer in ``[low, high]`` for argparse, or its error naming what is accepted."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}; accepted: {accepted}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{value} is not {kind}; accepted: {accepted}")
    return value


def port_arg(text: str) -> int:
    """A TCP port: an integer in ``[1, 65535]``."""
    return _int_arg(text, 1, 65535, "an integer in [1, 65535]", "a TCP port")


def positive_int_arg(text: str) -> int:
    """An integer ≥ 1."""
    return _int_arg(text, 1, None, "an integer ≥ 1", "a positive integer")


def opacity_arg(text: str) -> float:
    """``--alpha``: an opacity in ``[0, 1]``."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}; accepted: a number in [0, 1] (0: the image only, 1: the map only)")
    return value


def cmap_arg(text: str) -> str:
    """``--cmap``: the name of a matplotlib colormap."""
    import argparse

    import matplotlib

    if text not in matplotlib.colormaps:
        raise argparse.ArgumentTypeError(f"{text!r} is not a matplotlib colormap; accepted: e.g. jet, viridis, "
                                         "inferno, turbo (matplotlib.colormaps)")
    return text
