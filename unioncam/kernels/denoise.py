"""AMD (paper eqs. 1–3): the denoised gradient map, ``L_den``.

For each channel ``k`` of the gradient ``W`` (shape ``[B, K, h, w]``):
``p_k`` = θ-th percentile of ``W_k`` (linear interpolation between order statistics, as
``torch.quantile``), ``D_k = W_k·1[W_k ≥ p_k]``, ``S_k = Σ relu(D_k)``, ``α_k = 1/S_k`` where ``D_k > 0``
(0 where ``S_k = 0``), and ``L_den = Σ_k α_k ⊙ relu(D_k) ⊙ A_k``.

Two paths, one contract: :func:`denoise_torch` (plain torch) and :func:`denoise_triton` (one launch:
percentile, threshold, weighting, per-block channel sums and the removed-fraction counts fused; one
small torch sum over the channel blocks finishes it). The kernel streams each channel in fixed-size
tiles, so its registers do not grow with the map size.
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
    # Integer counts, then one division, as the kernel does: a float mean may multiply by 1/n instead
    # (CUDA's does) and differ in the last bit.
    return cam, removed.sum((1, 2)) / (K * h * w), removed_pos.float()


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
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _denoise_kernel(
        g_ptr, a_ptr, cam_ptr, count_ptr,
        K, HW, rank_lo, rank_hi, weight,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Program (b, j): channels j·BLOCK_K … of image b. It writes that block's share of the channel
        # sum (cam_ptr[b, j, :]) and its three counts (count_ptr[b, j, :]); the caller sums the blocks.
        # Each channel is streamed in tiles of BLOCK_N values, pass after pass, so registers hold one
        # tile whatever h·w is (a whole channel in registers spilled from 112² on). The passes are
        # `while` loops: see _triton's docstring on runtime trip counts.
        b = tl.program_id(0)
        j = tl.program_id(1)
        cols = tl.arange(0, BLOCK_N)
        KEY_MAX: tl.constexpr = 2**31 - 1
        KEY_MIN: tl.constexpr = -(2**31)
        rows = j * BLOCK_K + tl.arange(0, BLOCK_K)
        # The block's first value is an int64 offset (B·K·h·w passes 2**31 on large batches of large
        # maps); offsets within the block are int32 (the launcher keeps BLOCK_K·h·w under 2**31), which
        # spares the 64-bit row offsets that ptxas otherwise spills.
        first = (b.to(tl.int64) * K + j * BLOCK_K) * HW
        g_blk = g_ptr + first
        a_blk = a_ptr + first
        # Padding rows past K repeat channel K − 1 until the last two passes, which mask them out: the
        # percentile search then needs no row mask (predicates live across it were spilled to the stack).
        row_off = ((tl.minimum(rows, K - 1) - j * BLOCK_K) * HW)[:, None]

        # Pass 1: each channel's smallest and largest key. Keys are int32 (half the registers of the
        # tiles); the bisection's bounds are int64 so that lo + (hi − lo) / 2 cannot overflow.
        lo = tl.full([BLOCK_K], KEY_MAX, tl.int32)
        hi = tl.full([BLOCK_K], KEY_MIN, tl.int32)
        p0 = 0
        while p0 < HW:
            pix = p0 + cols
            ok = (pix < HW)[None, :]
            key = _order_key(tl.load(g_blk + row_off + pix[None, :], mask=ok, other=0.0).to(tl.float32))
            lo = tl.minimum(lo, tl.min(tl.where(ok, key, KEY_MAX), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(ok, key, KEY_MIN), axis=1))
            p0 += BLOCK_N
        lo = lo.to(tl.int64)
        hi = hi.to(tl.int64)

        # eq. 1, the percentile: the rank_lo-th smallest key by bisection on [min, max] (exact, at most
        # 32 halvings for the int32 range; no sort), one counting pass per halving, until every
        # channel's range is a single key.
        while tl.max(hi - lo, axis=0) > 0:
            mid = lo + ((hi - lo) >> 1)
            mid32 = mid.to(tl.int32)  # lo ≤ mid ≤ hi: a key, so it fits
            cnt = tl.zeros([BLOCK_K], tl.int32)
            p0 = 0
            while p0 < HW:
                pix = p0 + cols
                ok = (pix < HW)[None, :]
                key = _order_key(tl.load(g_blk + row_off + pix[None, :], mask=ok, other=0.0).to(tl.float32))
                cnt += tl.sum((ok & (key <= mid32[:, None])).to(tl.int32), axis=1)
                p0 += BLOCK_N
            take = cnt >= rank_lo + 1
            hi = tl.where(take, mid, hi)
            lo = tl.where(take, lo, mid + 1)
        t = lo.to(tl.int32)

        # Pass: the rank_lo-th value, how many keys are at or below it, and the smallest value above.
        v_lo = tl.full([BLOCK_K], float("-inf"), tl.float32)
        next_up = tl.full([BLOCK_K], float("inf"), tl.float32)
        cnt_t = tl.zeros([BLOCK_K], tl.int32)
        p0 = 0
        while p0 < HW:
            pix = p0 + cols
            ok = (pix < HW)[None, :]
            g = tl.load(g_blk + row_off + pix[None, :], mask=ok, other=0.0).to(tl.float32)
            key = _order_key(g)
            at_or_below = ok & (key <= t[:, None])
            v_lo = tl.maximum(v_lo, tl.max(tl.where(at_or_below, g, float("-inf")), axis=1))
            cnt_t += tl.sum(at_or_below.to(tl.int32), axis=1)
            next_up = tl.minimum(next_up, tl.min(tl.where(ok & (key > t[:, None]), g, float("inf")), axis=1))
            p0 += BLOCK_N
        # The next order statistic is v_lo again when it is tied, else the smallest value above it.
        v_hi = tl.where(cnt_t >= rank_hi + 1, v_lo, next_up)
        # torch's lerp, branch for branch, so the threshold matches torch.quantile's.
        diff = v_hi - v_lo
        p = tl.where(weight < 0.5, v_lo + weight * diff, v_hi - diff * (1.0 - weight))

        # Pass: S_k = Σ relu(D_k) and the counts.
        row_ok = rows < K
        s = tl.zeros([BLOCK_K], tl.float32)
        # Per-block counts: int32 holds them (BLOCK_K·h·w < 2**31); one scalar each keeps them cheap.
        n_removed = tl.full([], 0, tl.int32)
        n_positive = tl.full([], 0, tl.int32)
        n_removed_pos = tl.full([], 0, tl.int32)
        p0 = 0
        while p0 < HW:
            pix = p0 + cols
            ok = row_ok[:, None] & (pix < HW)[None, :]
            g = tl.load(g_blk + row_off + pix[None, :], mask=ok, other=0.0).to(tl.float32)
            removed = ok & (g < p[:, None])
            positive = ok & (g > 0)
            s += tl.sum(tl.maximum(tl.where(removed, 0.0, g), 0.0), axis=1)  # relu(D_k), summed
            n_removed += tl.sum(tl.sum(removed.to(tl.int32), axis=1), axis=0)
            n_positive += tl.sum(tl.sum(positive.to(tl.int32), axis=1), axis=0)
            n_removed_pos += tl.sum(tl.sum((removed & positive).to(tl.int32), axis=1), axis=0)
            p0 += BLOCK_N
        inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)  # α_k = 1/S_k where D_k > 0

        # Pass: eq. 2 over this block's channels, written tile by tile.
        out = b * tl.num_programs(1) + j
        cam_base = out.to(tl.int64) * HW
        p0 = 0
        while p0 < HW:
            pix = p0 + cols
            col_ok = pix < HW
            ok = row_ok[:, None] & col_ok[None, :]
            g = tl.load(g_blk + row_off + pix[None, :], mask=ok, other=0.0).to(tl.float32)
            a = tl.load(a_blk + row_off + pix[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok & (g < p[:, None]), 0.0, g)  # D_k
            pos = tl.maximum(d, 0.0)  # relu(D_k)
            cam = tl.sum(tl.where(d > 0, inv[:, None], 0.0) * pos * a, axis=0)
            tl.store(cam_ptr + cam_base + pix, cam, mask=col_ok)
            p0 += BLOCK_N
        tl.store(count_ptr + out * 3, n_removed.to(tl.int64))
        tl.store(count_ptr + out * 3 + 1, n_positive.to(tl.int64))
        tl.store(count_ptr + out * 3 + 2, n_removed_pos.to(tl.int64))


def denoise_blocks(K: int, HW: int, block_k: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_N, num_warps)`` of a launch: ``BLOCK_K`` channels, streamed ``BLOCK_N`` values
    at a time.

    On a GPU a tile holds at most 1024 values whatever the map size (4 channels × 256 on VGG16's
    14×14 layers, 1 × 1024 from 32×32 on), 4 warps: registers no longer grow with ``h·w``
    (``python -m unioncam.kernels.compile_check`` reports them). The interpreter runs programs one by
    one, so there a tile takes up to 64 channels and 8192 values.
    """
    if INTERPRETED:
        block_k = block_k or 64
        tile = 8192
    else:
        block_k = block_k or 4
        tile = 1024
    if HW >= 2**31:
        raise ValueError(f"denoise: maps of {HW} values are over 2**31")
    block_n = min(triton.next_power_of_2(HW), tile)
    block_k = max(1, min(block_k, triton.next_power_of_2(K), tile // block_n))
    while block_k > 1 and block_k * HW >= 2**31:  # the kernel's offsets within a block are int32
        block_k //= 2
    return block_k, block_n, 4


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
    counts = torch.empty(B, blocks, 3, device=g.device, dtype=torch.int64)
    launch(
        "denoise", _denoise_kernel, (B, blocks), g, a, cam, counts, K, HW, rank_lo, rank_hi, weight,
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    n_removed, n_positive, n_removed_pos = counts.sum(1).unbind(1)
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
