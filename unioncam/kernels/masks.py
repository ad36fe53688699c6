"""Score-CAM masks: ``M_k = norm(up(A_k))`` and the masked inputs ``x ⊙ M_k``.

Two ops: :func:`upsampled_range` gives each channel's min and max after up-sampling (a channel whose
up-sampled map is constant is pruned exactly), :func:`masked_inputs` builds one chunk of masked inputs
for a list of (image, channel) pairs.
"""

from __future__ import annotations

import torch

from .maps import up

__all__ = ["upsampled_range", "upsampled_range_torch", "masked_inputs", "masked_inputs_torch"]


def upsampled_range_torch(
    acts: torch.Tensor, size: tuple[int, int], chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(min, max)`` of ``up(A_k)``, each ``[B, K]`` float32.

    Up-samples ``chunk`` channels at a time so the full ``[B, K, H, W]`` stack never exists.
    """
    B, K = acts.shape[:2]
    flat = acts.reshape(B * K, *acts.shape[2:])
    lo = torch.empty(B * K, device=acts.device, dtype=torch.float32)
    hi = torch.empty_like(lo)
    for i in range(0, B * K, chunk):
        u = up(flat[i : i + chunk], size).flatten(1)
        lo[i : i + chunk] = u.amin(1)
        hi[i : i + chunk] = u.amax(1)
    return lo.view(B, K), hi.view(B, K)


def masked_inputs_torch(
    images: torch.Tensor,
    acts: torch.Tensor,
    image_idx: torch.Tensor,
    channel_idx: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x_b ⊙ (up(A_bk) − lo) / (hi − lo)`` for each pair ``(b, k) = (image_idx[i], channel_idx[i])``.

    Args:
        images: ``[B, 3, H, W]`` pixels.
        acts: ``[B, K, h, w]`` activations.
        image_idx, channel_idx: ``[n]`` long, the pairs to build.
        lo, hi: ``[n]`` the range of each pair's up-sampled map (``hi > lo``: constant maps are pruned
            before this is called).
        out_dtype: dtype of the result (the model's input dtype).
        normalize: optional ``(mean, std)`` broadcastable to ``[1, 3, 1, 1]``, applied to the masked
            pixels, for models fed already-normalised input.

    Returns:
        ``[n, 3, H, W]`` in ``out_dtype``.
    """
    size = images.shape[-2:]
    u = up(acts[image_idx, channel_idx], tuple(size))  # [n, H, W]
    m = (u - lo[:, None, None]) / (hi - lo)[:, None, None]
    out = images[image_idx].float() * m[:, None]
    if normalize is not None:
        mean, std = normalize
        out = (out - mean) / std
    return out.to(out_dtype)


def upsampled_range(acts: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel range of the up-sampled maps on the best available path."""
    return upsampled_range_torch(acts, size)


def masked_inputs(
    images: torch.Tensor,
    acts: torch.Tensor,
    image_idx: torch.Tensor,
    channel_idx: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Masked inputs on the best available path (see :func:`masked_inputs_torch`)."""
    return masked_inputs_torch(images, acts, image_idx, channel_idx, lo, hi, out_dtype, normalize)
