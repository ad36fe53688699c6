"""A small CNN for the ground-truth benchmark's synthetic shapes, and its committed weights.

The weights ship inside the package (``unioncam/models/weights/shapes_cnn.pt``, trained by
``benchmarks/groundtruth/train.py``) and are read with :mod:`importlib.resources`, so a wheel has them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .vgg import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SHAPE_CLASSES", "ShapesCNN", "default_weights", "load_shapes_cnn"]

#: Class index → name. The object's outline is the only thing that tells them apart.
SHAPE_CLASSES: tuple[str, ...] = ("disk", "square", "triangle", "cross", "ring")


@contextlib.contextmanager
def default_weights() -> Iterator[Path]:
    """The path of the shipped weights while the context lasts (a real file even from a zipped install)."""
    with resources.as_file(resources.files("unioncam.models") / "weights" / "shapes_cnn.pt") as path:
        yield path


class ShapesCNN(nn.Module):
    """A small VGG-style CNN (≈ 0.25 M parameters) for the synthetic shapes, taking pixels in ``[0, 1]``.

    Like :class:`unioncam.PixelVGG16`, the ImageNet normalisation is its first operation, so a black
    image is all zeros. Explained layer: ``features.17``, the ReLU after the last conv (128 × H/8 × W/8).
    """

    default_layer = "features.17"

    def __init__(self, num_classes: int = len(SHAPE_CLASSES)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            # Batch norm makes training converge in minutes; in eval mode it is a fixed affine map.
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(3, 16),
            nn.MaxPool2d(2),  # 0-3
            *block(16, 32),
            nn.MaxPool2d(2),  # 4-7
            *block(32, 64),
            nn.MaxPool2d(2),  # 8-11
            *block(64, 128),
            *block(128, 128),  # 12-17: features.17 is the last ReLU
        )
        self.classifier = nn.Linear(128, num_classes)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                # He initialisation: PyTorch's default shrinks the signal layer by layer and training stalls.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.categories: list[str] = (
            list(SHAPE_CLASSES) if num_classes == len(SHAPE_CLASSES) else [str(i) for i in range(num_classes)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features((x - self.mean) / self.std)
        return self.classifier(a.mean((2, 3)))


def load_shapes_cnn(
    weights: str | os.PathLike | None = None, device: str | torch.device | None = None, seed: int = 0
) -> ShapesCNN:
    """The trained :class:`ShapesCNN` in eval mode (``weights=None`` → the shipped file), frozen.

    ``weights="random"``: its initialisation seeded by ``seed`` (the caller's RNG is untouched).
    """
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ShapesCNN()
        model.eval().requires_grad_(False)
        return model.to(device) if device is not None else model
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(
            f"weights: {str(weights)!r} does not exist (train it with benchmarks/groundtruth/train.py)"
        )
    with default_weights() if weights is None else contextlib.nullcontext(Path(weights)) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = ShapesCNN(num_classes=state["classifier.weight"].shape[0])
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model
