"""AMD (paper eqs. 1–3): the denoised gradient map, ``L_den``.

For each channel ``k`` of the gradient ``W`` (shape ``[B, K, h, w]``):
``p_k`` = θ-th percentile of ``W_k`` (linear interpolation between order statistics, as
``torch.quantile``), ``D_k = W_k·1[W_k ≥ p_k]``, ``S_k = Σ relu(D_k)``, ``α_k = 1/S_k`` where ``D_k > 0``
(0 where ``S_k = 0``), and ``L_den = Σ_k α_k ⊙ relu(D_k) ⊙ A_k``.

Two paths, one contract: :func:`denoise_torch` (plain torch) and :func:`denoise_triton` (one launch:
percentile, threshold, weighting, per-block channel sums and the removed-fraction counts fused; one
small torch sum over the channel blocks finishes it).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRETED, KernelUnavailable, fall_back, launch, tl, triton, use_triton

__all__ = ["denoise", "denoise_torch", "denoise_triton"]


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


def _quantile_ranks(theta: float, n: int) -> tuple[int, int, float]:
    """``torch.quantile``'s ranks and weight for ``q = θ/100`` over ``n`` values, in its float32 arithmetic."""
    q = torch.tensor(theta / 100.0, dtype=torch.float32)
    rank = q * (n - 1)  # float32, as torch.quantile computes it
    below = int(rank.floor().item())
    above = int(rank.ceil().item())
    return below, min(above, n - 1), float((rank - below).item())


if HAS_TRITON:

    @triton.jit
    def _order_key(v):
        # IEEE floats ordered as signed ints once the magnitude bits of negatives are flipped.
        bits = v.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)

    @triton.jit
    def _denoise_kernel(
        g_ptr, a_ptr, cam_ptr, count_ptr,
        K, HW, rank_lo, rank_hi, weight,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Program (b, j): channels j·BLOCK_K … of image b. It writes that block's share of the channel
        # sum (cam_ptr[b, j, :]) and its three counts (count_ptr[b, j, :]); the caller sums the blocks.
        b = tl.program_id(0)
        j = tl.program_id(1)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < HW
        BIG: tl.constexpr = 1 << 40  # above every int32 key: padding never counts as "≤ t"
        rows = j * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < K
        ok = row_ok[:, None] & col_ok[None, :]
        offs = (b * K + rows[:, None]).to(tl.int64) * HW + cols[None, :]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        key = tl.where(ok, _order_key(g), BIG)
        # eq. 1, the percentile: the rank_lo-th smallest key by bisection on [min, max] (exact,
        # 32 halvings cover the int32 range; no sort).
        lo = tl.min(key, axis=1)
        hi = tl.max(tl.where(ok, key, -BIG), axis=1)
        for _ in range(32):
            mid = lo + ((hi - lo) >> 1)
            cnt = tl.sum((key <= mid[:, None]).to(tl.int32), axis=1)
            take = cnt >= rank_lo + 1
            hi = tl.where(take, mid, hi)
            lo = tl.where(take, lo, mid + 1)
        t = lo
        at_or_below = key <= t[:, None]
        v_lo = tl.max(tl.where(at_or_below, g, float("-inf")), axis=1)
        cnt_t = tl.sum(at_or_below.to(tl.int32), axis=1)
        # The next order statistic is v_lo again when it is tied, else the smallest value above it.
        next_up = tl.min(tl.where(ok & (key > t[:, None]), g, float("inf")), axis=1)
        v_hi = tl.where(cnt_t >= rank_hi + 1, v_lo, next_up)
        # Padding rows past K have no values (±inf above): keep them finite so nothing turns NaN.
        v_lo = tl.where(row_ok, v_lo, 0.0)
        v_hi = tl.where(row_ok, v_hi, 0.0)
        # torch's lerp, branch for branch, so the threshold matches torch.quantile's.
        diff = v_hi - v_lo
        p = tl.where(weight < 0.5, v_lo + weight * diff, v_hi - diff * (1.0 - weight))
        removed = ok & (g < p[:, None])
        d = tl.where(removed, 0.0, g)  # D_k
        pos = tl.maximum(d, 0.0)  # relu(D_k)
        s = tl.sum(pos, axis=1)  # S_k
        inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)  # α_k = 1/S_k where D_k > 0
        a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        cam = tl.sum(tl.where(d > 0, inv[:, None], 0.0) * pos * a, axis=0)  # eq. 2, this block's channels
        positive = ok & (g > 0)
        out = b * tl.num_programs(1) + j
        tl.store(cam_ptr + out.to(tl.int64) * HW + cols, cam, mask=col_ok)
        tl.store(count_ptr + out * 3, tl.sum(tl.sum(removed.to(tl.int32), axis=1), axis=0))
        tl.store(count_ptr + out * 3 + 1, tl.sum(tl.sum(positive.to(tl.int32), axis=1), axis=0))
        tl.store(count_ptr + out * 3 + 2, tl.sum(tl.sum((removed & positive).to(tl.int32), axis=1), axis=0))


def denoise_blocks(K: int, HW: int, block_k: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_N, num_warps)`` of a launch: a whole channel per row.

    On a GPU a program holds at most 1024 values (4 channels of 14×14 on VGG16's last layer: 128
    programs per image, 96 registers a thread and no spills when compiled for sm_90, where 16 channels
    needed 255 registers and spilled); warps grow with a wider channel. The interpreter runs programs
    one by one, so there a program takes up to 64 channels.
    """
    block_n = triton.next_power_of_2(HW)
    if INTERPRETED:
        block_k = block_k or 64
        cap = 8192
    else:
        block_k = block_k or 4
        cap = 1024
    block_k = max(1, min(block_k, triton.next_power_of_2(K), max(1, cap // block_n)))
    return block_k, block_n, min(16, max(4, block_k * block_n // 256))


def denoise_triton(
    grads: torch.Tensor, acts: torch.Tensor, theta: float, block_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AMD in one Triton launch (a program per image and block of channels); contract of :func:`denoise_torch`.

    Each program thresholds and weighs its channels and writes their partial channel sum; one torch
    sum over the blocks finishes it, in a fixed order, so the result is deterministic.

    Raises:
        KernelUnavailable: the kernel could not be built or launched.
    """
    if not HAS_TRITON:
        raise RuntimeError("denoise_triton needs triton; use denoise() to fall back to torch")
    B, K, h, w = grads.shape
    HW = h * w
    g = grads.contiguous()
    a = acts.contiguous()
    rank_lo, rank_hi, weight = _quantile_ranks(theta, HW)
    block_k, block_n, num_warps = denoise_blocks(K, HW, block_k)
    blocks = triton.cdiv(K, block_k)
    cam = torch.empty(B, blocks, h, w, device=g.device, dtype=torch.float32)
    counts = torch.empty(B, blocks, 3, device=g.device, dtype=torch.int32)
    launch(
        "denoise", _denoise_kernel, (B, blocks), g, a, cam, counts, K, HW, rank_lo, rank_hi, weight,
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    n_removed, n_positive, n_removed_pos = counts.sum(1, dtype=torch.int64).unbind(1)
    return cam.sum(1), n_removed / (K * HW), n_removed_pos / n_positive.clamp_min(1)


def denoise(
    grads: torch.Tensor, acts: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AMD on the best available path (see :func:`denoise_torch` for the contract, :func:`use_triton`)."""
    if use_triton(grads, acts, op="denoise"):
        try:
            return denoise_triton(grads, acts, theta)
        except KernelUnavailable as e:
            fall_back("denoise", e)
    return denoise_torch(grads, acts, theta)
