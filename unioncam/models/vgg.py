"""VGG16 that takes pixel-space input, and the ways to get its weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.models import VGG16_Weights, vgg16
from torchvision.models.vgg import VGG

from .checkpoint import read_state_dict

__all__ = ["PixelVGG16", "load_vgg16", "IMAGENET_MEAN", "IMAGENET_STD", "imagenet_categories"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in index order (shipped with torchvision, no download)."""
    return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


class PixelVGG16(VGG):
    """torchvision's VGG16 whose first operation is the ImageNet normalisation.

    It takes ``[N, 3, H, W]`` pixels in ``[0, 1]``, so a black image is all zeros and masking an input
    multiplies pixels. Its ``state_dict`` has torchvision's keys (mean and std are not saved), so
    torchvision checkpoints load unchanged and layer names such as ``features.29`` keep their meaning.
    """

    default_layer = "features.29"

    def __init__(self, num_classes: int = 1000) -> None:
        base = vgg16(weights=None, num_classes=num_classes)
        super().__init__(base.features, num_classes=num_classes, init_weights=False)
        self.load_state_dict(base.state_dict())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.categories: list[str] = imagenet_categories() if num_classes == 1000 else [
            str(i) for i in range(num_classes)
        ]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[0, 1]`` → the normalised input torchvision's VGG16 was trained on."""
        return (x - self.mean) / self.std

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of an already normalised input (for fused kernels that normalise themselves)."""
        return super().forward(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))


def _offline_help(cache: Path) -> str:
    return (
        f"Could not get torchvision's ImageNet VGG16 weights ({VGG16_Weights.IMAGENET1K_V1.url}). "
        "This machine may be offline. Either download that file elsewhere and put it at "
        f"{cache} (the torch hub cache; set TORCH_HOME to move it), or pass its path: "
        "load_vgg16('/path/to/vgg16-397923af.pth') / --weights PATH. "
        "For tests and demos without a download use weights='random'."
    )


def load_vgg16(
    weights: str | os.PathLike = "imagenet",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> PixelVGG16:
    """A VGG16 in eval mode that takes pixel-space input ``[N, 3, H, W]`` in ``[0, 1]``.

    Args:
        weights: ``"imagenet"`` (torchvision's IMAGENET1K_V1: read from the torch hub cache under
            ``$TORCH_HOME``, else downloaded), ``"random"`` (torchvision's initialisation, seeded by
            ``seed``, identical on every machine) or the path of a torchvision-format state dict.
        seed: seed for ``"random"``.
        device: where to put the model (default CPU).

    Returns:
        :class:`PixelVGG16` with ``default_layer == "features.29"`` and ``categories`` (1000 names).
        Its parameters do not require gradients: explanations need gradients of activations only.

    Raises:
        RuntimeError: ImageNet weights asked for and neither cached nor downloadable (message says how
            to provide them).
        FileNotFoundError / ValueError: a path that does not exist or is not a VGG16 state dict.
    """
    if isinstance(weights, str) and weights == "random":
        # A private generator keeps the caller's global RNG untouched and makes "random" reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PixelVGG16()
    elif isinstance(weights, str) and weights == "imagenet":
        model = PixelVGG16()
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        cached = hub_dir / os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # URLError, socket errors, partial downloads: all mean "not available"
            raise RuntimeError(_offline_help(cached)) from exc
        model.load_state_dict(state)
    else:
        state, path = read_state_dict(weights, "'imagenet', 'random'")
        num_classes = state["classifier.6.weight"].shape[0] if "classifier.6.weight" in state else 1000
        model = PixelVGG16(num_classes=num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"weights: {path} is not a torchvision VGG16 state dict: {exc}") from exc
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model
