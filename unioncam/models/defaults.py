"""What a command uses when ``--model`` or ``--weights`` is left out: one rule for every command.

* Neither given: ImageNet VGG16 when its weights are in the torch hub cache, else the trained ``shapes``
  CNN that ships in the package (its maps mean something, in well under a second on a CPU), with a
  notice that says so and how to get VGG16. Nothing is downloaded unasked.
* ``--model`` given, ``--weights`` left out: the model's trained weights (``shipped`` for ``shapes``,
  ``imagenet`` for the others: read from the cache, or downloaded; offline the error says what to do).
* ``--weights`` given, ``--model`` left out: VGG16 with those weights.

Random weights are only ever used when asked for (``--weights random``), and then every place that
shows the model says so (:func:`weights_label`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODEL_HELP", "WEIGHTS_HELP", "Choice", "choose", "resolve_args", "imagenet_cache_file", "model_arg",
           "random_warning", "weights_label"]


def model_arg(text: str) -> str:
    """``--model`` of the commands whose worker must rebuild the model by name (``archive``, ``serve``):
    a :data:`unioncam.models.MODELS` name or ``timm/<name>``."""
    import argparse

    from . import is_known_model

    if not is_known_model(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a known model; accepted: vgg16, shapes, a torchvision "
                                         "classifier name (resnet50, vit_b_16, …) or timm/<name>")
    return text


def imagenet_cache_file(model: str) -> Path:
    """Where the default ImageNet weights of ``model`` live: torchvision's in the torch hub cache, a timm
    model's at :func:`unioncam.models.timm_zoo.timm_cache_file`."""
    import torch

    from .timm_zoo import is_timm, timm_cache_file

    if is_timm(model):
        return timm_cache_file(model)
    from torchvision.models import get_model_weights

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(get_model_weights(model).DEFAULT.url)


@dataclass(frozen=True)
class Choice:
    model: str
    weights: str | None  #: ``imagenet``, ``shipped`` (shapes), ``random``, a torchvision weights name or a path
    notice: str | None = None  #: a line for the user when the choice was made for them


def choose(model: str | None, weights: str | None) -> Choice:
    """The model and weights for ``--model``/``--weights`` (``None``: left out), by the module's rule."""
    if model is None and weights is None:
        cached = imagenet_cache_file("vgg16")
        if cached.is_file():
            return Choice("vgg16", "imagenet")
        return Choice("shapes", "shipped", (
            f"note: no ImageNet VGG16 weights in the torch hub cache ({cached}): using the trained shapes CNN "
            "(classes disk, square, triangle, cross, ring; 64×64 images, e.g. samples/shapes/*.png). "
            "For VGG16 pass --model vgg16 (downloads its 528 MB ImageNet weights once, into that cache)."))
    model = model or "vgg16"
    if weights is None and ":" not in model:  # a user's factory brings its own weights
        weights = "shipped" if model == "shapes" else "imagenet"
    return Choice(model, weights)


def weights_label(weights: str, seed: int = 0) -> str:
    """How the weights are named to a user: ``random (seed 0)`` for random ones, else as given."""
    return f"random (seed {seed})" if weights == "random" else str(weights)


def random_warning(model: str, seed: int = 0) -> str:
    """The line printed wherever a model with random weights is served or used."""
    return (f"warning: {model} has RANDOM weights (seed {seed}): its classes and maps mean nothing. "
            "Leave out --weights for trained ones.")


#: The ``--model`` / ``--weights`` help of every command.
MODEL_HELP = ("vgg16, shapes (the trained CNN of the ground-truth benchmark, shipped), any torchvision classifier by "
              "name (resnet50, densenet121, convnext_tiny, vit_b_16, swin_t, …), any timm model as timm/NAME "
              "(timm/resnet50, timm/vit_base_patch16_224, …; needs unioncam[timm]){factory}; default vgg16 if its "
              "ImageNet weights are in the torch hub cache, else shapes (a note says so)")
WEIGHTS_HELP = ("'imagenet' (torchvision's or timm's pretrained, from their cache or downloaded; 'pretrained' is the "
                "same), a torchvision weights name "
                "(e.g. IMAGENET1K_V2), 'shipped' (shapes: the weights in the package), 'random' (seeded by "
                "--weights-seed: maps mean nothing, for trying things out) or a path to a state dict of --model; "
                "default the model's trained weights (shipped for shapes, else imagenet)")


def resolve_args(args, command: str, size: str = "size") -> Choice:
    """Fill ``args.model`` / ``args.weights`` (and ``args.<size>`` when left out: the model's own image size)
    by :func:`choose`, printing its notice — and a warning for random weights — to stderr."""
    from .cost import default_image_size

    choice = choose(args.model, args.weights)
    args.model, args.weights = choice.model, choice.weights
    if choice.notice:
        print(f"unioncam {command}: {choice.notice}", file=sys.stderr)
    if choice.weights == "random":
        print(f"unioncam {command}: {random_warning(choice.model, getattr(args, 'weights_seed', 0))}", file=sys.stderr)
    if getattr(args, size, None) is None:
        setattr(args, size, default_image_size(choice.model))
    return choice
