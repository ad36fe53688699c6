"""Small seeded models for the tests and ``benchmarks/bench_precision.py``; importing this changes nothing."""

import torch
from torch import nn


class TinyCNN(nn.Module):
    """A small pixel-space CNN whose explained layer ``conv2`` is pre-ReLU (activations can be negative)."""

    default_layer = "conv2"

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)  # in place on purpose: the engine must not see relu(A)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def make_tiny_cnn(seed: int = 0, classes: int = 10, width: int = 16, scale: float = 4.0) -> TinyCNN:
    """Seeded TinyCNN; ``scale`` multiplies the head so its softmax is not flat (β's well separated)."""
    g = torch.Generator().manual_seed(seed)
    m = TinyCNN(classes, width)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1))
        m.head.weight.mul_(scale)
    return m.eval()


def make_tiny_vgg(seed: int = 0, classes: int = 10, batch_norm: bool = False, pixel: bool = True,
                  cfg: tuple = (8, "M", 16, 16, "M", 16, "M")):
    """A seeded torchvision ``VGG`` with a few narrow conv → ReLU → max-pool blocks and a small head.

    Its forward is torchvision VGG's own, so the fast path's pool-first rewrite applies (not with
    ``batch_norm``: a BN between conv and ReLU is not monotone in general). ``pixel``: wrapped by
    ``unioncam.models.pixel_model`` (pixel input, ``forward_normalized``), as the zoo's models are.
    ``cfg``: torchvision's layer list (channels, ``"M"`` for a max-pool); its last block must end in a pool.
    """
    from torchvision.models.vgg import VGG, make_layers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = VGG(make_layers(list(cfg), batch_norm=batch_norm), num_classes=classes)
        m.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(32, classes))
        for p in m.parameters():
            if p.dim() == 1:  # torchvision zeroes conv biases: give them values, so their rounding shows
                p.data.normal_(0, 0.1)
    m.eval().requires_grad_(False)
    if pixel:
        from unioncam.models import pixel_model

        pixel_model(m, default_layer=f"features.{len(m.features) - 2}")
    else:
        m.default_layer = f"features.{len(m.features) - 2}"
    return m
