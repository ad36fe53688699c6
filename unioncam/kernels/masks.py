"""Score-CAM masks: ``M_k = norm(up(A_k))`` and the masked inputs ``x ⊙ M_k``.

Two ops: :func:`upsampled_range` gives each channel's min and max after up-sampling (a channel whose
up-sampled map is constant is pruned exactly), :func:`masked_inputs` builds one chunk of masked inputs
for a list of (image, channel) pairs.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRETED, KernelUnavailable, fall_back, launch, tl, triton, use_triton
from .maps import up

__all__ = [
    "upsampled_range",
    "upsampled_range_torch",
    "upsampled_range_triton",
    "masked_inputs",
    "masked_inputs_torch",
    "masked_inputs_triton",
]


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


def _scale(src: int, dst: int) -> float:
    # F.interpolate(size=...) uses float32 in/out as the source step; the same float here.
    return float(torch.tensor(src, dtype=torch.float32) / dst)


if HAS_TRITON:

    @triton.jit
    def _bilinear(src_ptr, row_base, pix, h, w, W_out, scale_h, scale_w):
        """``up(·)`` at output pixels ``pix`` of source rows starting at ``row_base``: F.interpolate's
        bilinear, ``align_corners=False``, same index and weight arithmetic (source index clamped at 0)."""
        oy = pix // W_out
        ox = pix % W_out
        sy = tl.maximum(scale_h * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
        sx = tl.maximum(scale_w * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = sy.to(tl.int32)  # sy ≥ 0, so truncation is floor
        x0 = sx.to(tl.int32)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        ly1 = sy - y0.to(tl.float32)
        lx1 = sx - x0.to(tl.float32)
        ly0 = 1.0 - ly1
        lx0 = 1.0 - lx1
        v00 = tl.load(src_ptr + row_base + y0 * w + x0).to(tl.float32)
        v01 = tl.load(src_ptr + row_base + y0 * w + x1).to(tl.float32)
        v10 = tl.load(src_ptr + row_base + y1 * w + x0).to(tl.float32)
        v11 = tl.load(src_ptr + row_base + y1 * w + x1).to(tl.float32)
        return (v00 * lx0 + v01 * lx1) * ly0 + (v10 * lx0 + v11 * lx1) * ly1

    @triton.jit
    def _range_kernel(
        a_ptr, lo_ptr, hi_ptr, R, h, w, H, W, scale_h, scale_w,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        base = tl.where(row_ok, rows, 0)[:, None] * (h * w)  # clamp padding rows to a valid address
        lo = tl.full([BLOCK_R], float("inf"), tl.float32)
        hi = tl.full([BLOCK_R], float("-inf"), tl.float32)
        p0 = 0
        while p0 < H * W:  # a while loop: see _triton's docstring on runtime trip counts
            pix = p0 + tl.arange(0, BLOCK_P)
            pix_ok = pix < H * W
            u = _bilinear(a_ptr, base, tl.where(pix_ok, pix, 0)[None, :], h, w, W, scale_h, scale_w)
            lo = tl.minimum(lo, tl.min(tl.where(pix_ok[None, :], u, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(pix_ok[None, :], u, float("-inf")), axis=1))
            p0 += BLOCK_P
        tl.store(lo_ptr + rows, lo, mask=row_ok)
        tl.store(hi_ptr + rows, hi, mask=row_ok)

    @triton.jit
    def _masked_kernel(
        x_ptr, a_ptr, bi_ptr, ki_ptr, lo_ptr, hi_ptr, mean_ptr, std_ptr, out_ptr,
        n, K, h, w, H, W, scale_h, scale_w,
        s_on, s_oc, s_oh, s_ow,
        NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n
        pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_ok = pix < H * W
        b = tl.load(bi_ptr + rows, mask=row_ok, other=0)
        k = tl.load(ki_ptr + rows, mask=row_ok, other=0)
        lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        safe_pix = tl.where(pix_ok, pix, 0)[None, :]
        u = _bilinear(a_ptr, (b * K + k).to(tl.int64)[:, None] * (h * w), safe_pix, h, w, W, scale_h, scale_w)
        m = (u - lo[:, None]) / (hi - lo)[:, None]  # M_k = norm(up(A_k)) with the precomputed range
        ok = row_ok[:, None] & pix_ok[None, :]
        oy = safe_pix // W
        ox = safe_pix % W
        x_base = b.to(tl.int64)[:, None] * (3 * H * W) + safe_pix
        o_base = rows.to(tl.int64)[:, None] * s_on + oy * s_oh + ox * s_ow
        for c in tl.static_range(3):
            v = tl.load(x_ptr + x_base + c * H * W, mask=ok, other=0.0).to(tl.float32) * m
            if NORMALIZE:
                v = (v - tl.load(mean_ptr + c)) / tl.load(std_ptr + c)
            tl.store(out_ptr + o_base + c * s_oc, v.to(out_ptr.dtype.element_ty), mask=ok)


def range_blocks(H: int, W: int, block_r: int | None = None, block_p: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_P, num_warps)`` of an ``upsampled_range`` launch: channels × pixels per step.

    GPU: 4 channels × 512 pixels, 4 warps — 72 registers a thread when compiled for sm_90, where
    16 × 1024 took 255 and spilled. The interpreter runs programs one by one: 64 channels a program.
    """
    block_r = block_r or (64 if INTERPRETED else 4)
    block_p = min(block_p or (1024 if INTERPRETED else 512), triton.next_power_of_2(H * W))
    return block_r, block_p, 4


def masked_blocks(H: int, W: int, block_r: int | None = None, block_p: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_P, num_warps)`` of a ``masked_inputs`` launch: masked inputs × pixels per program.

    GPU: one masked input × 1024 pixels, 4 warps — 72 registers a thread for sm_90 (4 × 1024 took 255).
    The interpreter runs programs one by one: 32 inputs a program.
    """
    return block_r or (32 if INTERPRETED else 1), min(block_p or 1024, triton.next_power_of_2(H * W)), 4


def upsampled_range_triton(
    acts: torch.Tensor, size: tuple[int, int], block_r: int | None = None, block_p: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract of :func:`upsampled_range_torch`; the up-sampled maps exist only tile by tile.

    Raises:
        KernelUnavailable: the kernel could not be built or launched.
    """
    if not HAS_TRITON:
        raise RuntimeError("upsampled_range_triton needs triton; use upsampled_range() to fall back to torch")
    B, K, h, w = acts.shape
    H, W = int(size[0]), int(size[1])
    a = acts.contiguous()
    lo = torch.empty(B * K, device=a.device, dtype=torch.float32)
    hi = torch.empty_like(lo)
    block_r, block_p, num_warps = range_blocks(H, W, block_r, block_p)
    launch(
        "upsampled_range", _range_kernel, (triton.cdiv(B * K, block_r),),
        a, lo, hi, B * K, h, w, H, W, _scale(h, H), _scale(w, W), BLOCK_R=block_r, BLOCK_P=block_p,
        num_warps=num_warps,
    )
    return lo.view(B, K), hi.view(B, K)


def masked_inputs_triton(
    images: torch.Tensor,
    acts: torch.Tensor,
    image_idx: torch.Tensor,
    channel_idx: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
    channels_last: bool = False,
    block_r: int | None = None,
    block_p: int | None = None,
) -> torch.Tensor:
    """Contract of :func:`masked_inputs_torch`, built straight into ``out_dtype``.

    Up-sampling, min–max, the product with the image and the optional normalisation happen in
    registers: no float32 ``[n, 3, H, W]`` intermediate exists. ``channels_last`` picks the layout of
    the result (what cuDNN convolutions prefer).

    Raises:
        KernelUnavailable: the kernel could not be built or launched.
    """
    if not HAS_TRITON:
        raise RuntimeError("masked_inputs_triton needs triton; use masked_inputs() to fall back to torch")
    B, K, h, w = acts.shape
    H, W = images.shape[-2:]
    n = int(image_idx.numel())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, 3, H, W), device=images.device, dtype=out_dtype, memory_format=fmt)
    if n == 0:
        return out
    x = images.contiguous()
    if normalize is not None:
        mean = normalize[0].reshape(-1).to(device=x.device, dtype=torch.float32).expand(3).contiguous()
        std = normalize[1].reshape(-1).to(device=x.device, dtype=torch.float32).expand(3).contiguous()
    else:
        mean = std = lo  # never read: NORMALIZE is a compile-time False
    block_r, block_p, num_warps = masked_blocks(H, W, block_r, block_p)
    grid = (triton.cdiv(n, block_r), triton.cdiv(H * W, block_p))
    launch(
        "masked_inputs", _masked_kernel, grid,
        x, acts.contiguous(), image_idx.contiguous(), channel_idx.contiguous(), lo.contiguous(),
        hi.contiguous(), mean, std, out, n, K, h, w, H, W, _scale(h, H), _scale(w, W), *out.stride(),
        NORMALIZE=normalize is not None, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=num_warps,
    )
    return out


def upsampled_range(acts: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel range of the up-sampled maps on the best available path (see :func:`use_triton`)."""
    if use_triton(acts, op="upsampled_range"):
        try:
            return upsampled_range_triton(acts, size)
        except KernelUnavailable as e:
            fall_back("upsampled_range", e)
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
    """Masked inputs on the best available path (see :func:`masked_inputs_torch` and :func:`use_triton`).

    On the Triton path the result is channels-last, the layout cuDNN prefers for the forwards.
    """
    if use_triton(images, acts, op="masked_inputs"):
        try:
            return masked_inputs_triton(
                images, acts, image_idx, channel_idx, lo, hi, out_dtype, normalize, channels_last=True
            )
        except KernelUnavailable as e:
            fall_back("masked_inputs", e)
    return masked_inputs_torch(images, acts, image_idx, channel_idx, lo, hi, out_dtype, normalize)
