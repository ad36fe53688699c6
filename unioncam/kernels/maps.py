"""Map helpers every layer uses: the spec's ``up(·)`` and ``norm(·)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["up", "minmax_norm"]


def up(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of ``[..., h, w]`` maps to ``size``, in float32."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def minmax_norm(maps: torch.Tensor) -> torch.Tensor:
    """Min–max normalise each ``[..., H, W]`` map to ``[0, 1]``; a constant map becomes all zeros."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    span = hi - lo
    # where() rather than an epsilon: a constant map is exactly zero, a non-constant one exactly [0, 1].
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0)
    return out.view_as(maps)
