"""AMD (paper eqs. 1–3): the denoised gradient map, ``L_den``.

For each channel ``k`` of the gradient ``W`` (shape ``[B, K, h, w]``):
``p_k`` = θ-th percentile of ``W_k`` (linear interpolation between order statistics, as
``torch.quantile``), ``D_k = W_k·1[W_k ≥ p_k]``, ``S_k = Σ relu(D_k)``, ``α_k = 1/S_k`` where ``D_k > 0``
(0 where ``S_k = 0``), and ``L_den = Σ_k α_k ⊙ relu(D_k) ⊙ A_k``.
"""

from __future__ import annotations

import torch

__all__ = ["denoise", "denoise_torch"]


def denoise_torch(
    grads: torch.Tensor, acts: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch AMD.

    Args:
        grads: ``W``, ``[B, K, h, w]``.
        acts: ``A``, ``[B, K, h, w]``.
        theta: percentile in ``[0, 100]``.

    Returns:
        ``(L_den [B, h, w], removed [B], removed_positive [B])`` in float32: ``removed`` is the share of
        gradient entries the threshold zeroed (``W < p``), ``removed_positive`` the share of positive
        entries it zeroed (the only ones that change the map, since relu drops the rest).
    """
    B, K, h, w = grads.shape
    g = grads.float().reshape(B, K, h * w)
    p = torch.quantile(g, theta / 100.0, dim=-1, keepdim=True)  # eq. 1: p(W_k, θ)
    removed = g < p
    d = torch.where(removed, 0.0, g)  # eq. 1: D_k
    pos = d.clamp_min(0)  # relu(D_k)
    s = pos.sum(-1, keepdim=True)  # S_k
    alpha = torch.where((d > 0) & (s > 0), 1.0 / torch.where(s > 0, s, 1.0), 0.0)  # eq. 3
    cam = (alpha * pos * acts.float().reshape(B, K, h * w)).sum(1).view(B, h, w)  # eq. 2
    positive = (g > 0).sum((1, 2))
    removed_pos = (removed & (g > 0)).sum((1, 2)) / positive.clamp_min(1)
    return cam, removed.float().mean((1, 2)), removed_pos.float()


def denoise(
    grads: torch.Tensor, acts: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AMD on the best available path (see :func:`denoise_torch` for the contract)."""
    return denoise_torch(grads, acts, theta)
