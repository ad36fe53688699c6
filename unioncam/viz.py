"""Overlays of saliency maps on images."""

from __future__ import annotations

import io

import torch
from matplotlib import colormaps
from PIL import Image

__all__ = ["overlay", "overlay_png"]


def overlay(image: torch.Tensor, saliency: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend a colour-mapped saliency map ``[H, W]`` in ``[0, 1]`` over an image ``[3, H, W]`` in ``[0, 1]``."""
    if image.shape[-2:] != saliency.shape[-2:]:
        raise ValueError(f"overlay: image {tuple(image.shape)} and saliency {tuple(saliency.shape)} differ in size")
    sal = saliency.detach().float().cpu().clamp(0, 1).numpy()
    heat = torch.from_numpy(colormaps[cmap](sal)[..., :3]).float().permute(2, 0, 1)
    mixed = (1 - alpha) * image.detach().float().cpu() + alpha * heat
    return Image.fromarray(mixed.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy(), mode="RGB")


def overlay_png(image: torch.Tensor, saliency: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> bytes:
    """:func:`overlay` encoded as PNG bytes."""
    buf = io.BytesIO()
    overlay(image, saliency, alpha, cmap).save(buf, format="PNG")
    return buf.getvalue()
