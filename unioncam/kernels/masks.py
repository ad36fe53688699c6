"""Score-CAM masks: ``M_k = norm(up(A_k))`` and the masked inputs ``x ⊙ M_k``.

Two ops: :func:`upsampled_range` gives each channel's min and max after up-sampling (a channel whose
up-sampled map is constant is pruned exactly), :func:`masked_inputs` builds one chunk of masked inputs
for a list of (image, channel) pairs.
"""

from __future__ import annotations

import torch

from ._triton import (
    HAS_TRITON,
    INTERPRETED,
    MAX_GRID_X,
    MAX_GRID_YZ,
    KernelUnavailable,
    fall_back,
    launch,
    tl,
    triton,
    use_triton,
)
from .maps import up

__all__ = [
    "upsampled_range",
    "upsampled_range_torch",
    "upsampled_range_triton",
    "masked_inputs",
    "masked_inputs_torch",
    "masked_inputs_triton",
    "masked_grid",
    "range_grid",
]


def upsampled_range_torch(
    acts: torch.Tensor, size: tuple[int, int], chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(min, max)`` of ``up(A_k)``, each ``[B, K]`` float32.

    Up-samples ``chunk`` channels of one image at a time so the full ``[B, K, H, W]`` stack never
    exists; slicing image by image keeps channels-last activations as views (no copy of the stack).
    """
    B, K = acts.shape[:2]
    lo = torch.empty(B, K, device=acts.device, dtype=torch.float32)
    hi = torch.empty_like(lo)
    for b in range(B):
        for i in range(0, K, chunk):
            u = up(acts[b, i : i + chunk], size).flatten(1)
            lo[b, i : i + chunk] = u.amin(1)
            hi[b, i : i + chunk] = u.amax(1)
    return lo, hi


def masked_inputs_torch(
    images: torch.Tensor,
    acts: torch.Tensor,
    image_idx: torch.Tensor,
    channel_idx: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x_b ⊙ (up(A_bk) − lo) / (hi − lo)`` for each pair ``(b, k) = (image_idx[i], channel_idx[i])``.

    Args:
        images: ``[B, 3, H, W]`` pixels.
        acts: ``[B, K, h, w]`` activations, any layout (channels-last, as models give them, included):
            only the ``n`` selected maps are gathered.
        image_idx, channel_idx: ``[n]`` long, the pairs to build.
        lo, hi: ``[n]`` the range of each pair's up-sampled map (``hi > lo``: constant maps are pruned
            before this is called).
        out_dtype: dtype of the result (the model's input dtype).
        normalize: optional ``(mean, std)`` broadcastable to ``[1, 3, 1, 1]``, applied to the masked
            pixels, for models fed already-normalised input.
        out: optionally, the ``[n, 3, H, W]`` tensor (any layout, dtype ``out_dtype``) to write into and
            return, e.g. a CUDA graph's static input.

    Returns:
        ``[n, 3, H, W]`` in ``out_dtype``.
    """
    size = images.shape[-2:]
    u = up(acts[image_idx, channel_idx], tuple(size))  # [n, H, W]
    m = (u - lo[:, None, None]) / (hi - lo)[:, None, None]
    res = images[image_idx].float() * m[:, None]
    if normalize is not None:
        mean, std = normalize
        res = (res - mean) / std
    if out is not None:
        return out.copy_(res)
    return res.to(out_dtype)


def _scale(src: int, dst: int) -> float:
    # F.interpolate(size=...) uses float32 in/out as the source step; the same float here.
    return float(torch.tensor(src, dtype=torch.float32) / dst)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _wide(*maps: tuple[int, int, int, int]) -> bool:
    """Whether an offset within one map, ``y·stride_y + x·stride_x`` for ``(rows, cols, stride_y,
    stride_x)``, can reach 2**31: the kernels then form those offsets in int64 (else int32, fewer
    registers). Offsets between maps, images and masked inputs are always int64."""
    return any((r - 1) * abs(sy) + (c - 1) * abs(sx) >= 2**31 for r, c, sy, sx in maps)


def range_grid(rows: int, block_r: int) -> tuple[int]:
    """Launch grid of ``upsampled_range``: one program per ``block_r`` channel maps, on axis 0.

    Axis 0 takes up to 2**31 − 1 programs, so every ``B·K`` that fits in memory launches.
    """
    grid = (_cdiv(rows, block_r),)
    if grid[0] > MAX_GRID_X:
        raise ValueError(f"upsampled_range: {rows} maps need more than {MAX_GRID_X} programs")
    return grid


def masked_grid(
    n: int, H: int, W: int, block_r: int, block_p: int, max_yz: int = MAX_GRID_YZ
) -> tuple[int, int, int]:
    """Launch grid of ``masked_inputs``: ``(pixel blocks, row blocks, planes of row blocks)``.

    Pixel blocks go on axis 0, which takes 2**31 − 1 programs (any image of ``H·W < 2**31`` pixels).
    CUDA caps axes 1 and 2 at 65,535 (``max_yz``; tests lower it), so the ``⌈n / block_r⌉`` row blocks
    are split over both: program ``(p, i, j)`` builds row block ``j·grid[1] + i``; at most
    ``grid[2] − 1`` programs of each pixel block find no row block and store nothing.
    """
    if H * W >= 2**31:
        raise ValueError(f"masked_inputs: images of {H}x{W} pixels are over 2**31 pixels")
    row_blocks = max(1, _cdiv(n, block_r))
    planes = _cdiv(row_blocks, max_yz)
    if planes > max_yz:
        raise ValueError(f"masked_inputs: {n} masked inputs need more than {max_yz}² programs a pixel block")
    return _cdiv(H * W, block_p), _cdiv(row_blocks, planes), planes


if HAS_TRITON:

    @triton.jit
    def _taps(oy, ox, h, w, s_h, s_w, scale_h, scale_w, WIDE: tl.constexpr):
        """Source offsets (within one map) and weights of ``up(·)`` at output pixels ``(oy, ox)``:
        F.interpolate's bilinear, ``align_corners=False``, same index and weight arithmetic (source
        index clamped at 0). ``WIDE``: offsets in int64, for maps whose offsets pass 2**31."""
        sy = tl.maximum(scale_h * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
        sx = tl.maximum(scale_w * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = sy.to(tl.int32)  # sy ≥ 0, so truncation is floor
        x0 = sx.to(tl.int32)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        ly1 = sy - y0.to(tl.float32)
        lx1 = sx - x0.to(tl.float32)
        if WIDE:
            y0 = y0.to(tl.int64)
            y1 = y1.to(tl.int64)
            x0 = x0.to(tl.int64)
            x1 = x1.to(tl.int64)
        r0 = y0 * s_h
        r1 = y1 * s_h
        c0 = x0 * s_w
        c1 = x1 * s_w
        return r0 + c0, r0 + c1, r1 + c0, r1 + c1, ly1, lx1

    @triton.jit
    def _lerp(src_ptr, base, o00, o01, o10, o11, ly1, lx1):
        """The up-sampled value of the maps starting at ``base`` (``[R, 1]``) at the pixels of the taps;
        callers clamp padding rows and pixels to valid ones, so the loads need no mask."""
        ly0 = 1.0 - ly1
        lx0 = 1.0 - lx1
        v00 = tl.load(src_ptr + base + o00).to(tl.float32)
        v01 = tl.load(src_ptr + base + o01).to(tl.float32)
        v10 = tl.load(src_ptr + base + o10).to(tl.float32)
        v11 = tl.load(src_ptr + base + o11).to(tl.float32)
        return (v00 * lx0 + v01 * lx1) * ly0 + (v10 * lx0 + v11 * lx1) * ly1

    @triton.jit
    def _range_kernel(
        a_ptr, lo_ptr, hi_ptr, R, K, h, w, HW, W, scale_h, scale_w,
        s_ab, s_ak, s_ah, s_aw,
        WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # Program i: maps i·BLOCK_R … of the flattened B·K, read through the activations' strides.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        safe = tl.where(row_ok, rows, 0)  # padding rows read map 0, a valid address
        base = ((safe // K) * s_ab + (safe % K) * s_ak)[:, None]
        lo = tl.full([BLOCK_R], float("inf"), tl.float32)
        hi = tl.full([BLOCK_R], float("-inf"), tl.float32)
        p0 = 0
        while p0 < HW:  # a while loop: see _triton's docstring on runtime trip counts
            pix = p0 + tl.arange(0, BLOCK_P)
            pix_ok = pix < HW
            safe_pix = tl.where(pix_ok, pix, 0)[None, :]
            oy = safe_pix // W
            ox = safe_pix % W
            o00, o01, o10, o11, ly1, lx1 = _taps(oy, ox, h, w, s_ah, s_aw, scale_h, scale_w, WIDE)
            u = _lerp(a_ptr, base, o00, o01, o10, o11, ly1, lx1)
            lo = tl.minimum(lo, tl.min(tl.where(pix_ok[None, :], u, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(pix_ok[None, :], u, float("-inf")), axis=1))
            p0 += BLOCK_P
        tl.store(lo_ptr + rows, lo, mask=row_ok)
        tl.store(hi_ptr + rows, hi, mask=row_ok)

    @triton.jit
    def _masked_kernel(
        x_ptr, a_ptr, bi_ptr, ki_ptr, lo_ptr, hi_ptr, mean_ptr, std_ptr, out_ptr,
        n, h, w, HW, W, scale_h, scale_w,
        s_xb, s_xc, s_xh, s_xw,
        s_ab, s_ak, s_ah, s_aw,
        s_on, s_oc, s_oh, s_ow,
        NORMALIZE: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # Program (p, i, j): pixels p·BLOCK_P … of masked inputs (j·grid[1] + i)·BLOCK_R … (see
        # masked_grid: CUDA caps axes 1 and 2 at 65,535 programs each). Everything is addressed
        # through strides: activations and images in whatever layout they come (channels-last
        # activations are not copied), the result in the layout the caller allocated.
        # Offsets across images, maps and rows are int64; within one map or image they are int32
        # unless WIDE (the launcher sets it when such an offset can pass 2**31).
        pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_ok = pix < HW
        safe_pix = tl.where(pix_ok, pix, 0)[None, :]
        oy = safe_pix // W
        ox = safe_pix % W
        o00, o01, o10, o11, ly1, lx1 = _taps(oy, ox, h, w, s_ah, s_aw, scale_h, scale_w, WIDE)
        if WIDE:
            oy = oy.to(tl.int64)
            ox = ox.to(tl.int64)
        x_pix = oy * s_xh + ox * s_xw
        o_pix = oy * s_oh + ox * s_ow
        r = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
        rows = r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n
        b = tl.load(bi_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        k = tl.load(ki_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
        ok = row_ok[:, None] & pix_ok[None, :]
        u = _lerp(a_ptr, (b * s_ab + k * s_ak)[:, None], o00, o01, o10, o11, ly1, lx1)
        m = (u - lo[:, None]) / (hi - lo)[:, None]  # M_k = norm(up(A_k)) with the precomputed range
        # Pointers step from colour to colour, so c·stride is never formed in 32 bits.
        xp = x_ptr + (b[:, None] * s_xb + x_pix)
        op = out_ptr + (rows.to(tl.int64)[:, None] * s_on + o_pix)
        for c in tl.static_range(3):
            v = tl.load(xp, mask=ok, other=0.0).to(tl.float32) * m
            if NORMALIZE:
                v = (v - tl.load(mean_ptr + c)) / tl.load(std_ptr + c)
            tl.store(op, v.to(out_ptr.dtype.element_ty), mask=ok)
            xp += s_xc
            op += s_oc


def range_blocks(
    H: int, W: int, block_r: int | None = None, block_p: int | None = None
) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_P, num_warps)`` of an ``upsampled_range`` launch: channels × pixels per step.

    GPU: 4 channels × 512 pixels, 4 warps (16 × 1024 needed 255 registers a thread for sm_90 and
    spilled; ``python -m unioncam.kernels.compile_check`` reports today's count). The interpreter runs
    programs one by one: 64 channels a program.
    """
    block_r = block_r or (64 if INTERPRETED else 4)
    block_p = min(block_p or (1024 if INTERPRETED else 512), triton.next_power_of_2(H * W))
    return block_r, block_p, 4


def masked_blocks(
    H: int, W: int, block_r: int | None = None, block_p: int | None = None
) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_P, num_warps)`` of a ``masked_inputs`` launch: masked inputs × pixels per program.

    GPU: one masked input × 1024 pixels, 4 warps (4 × 1024 needed 255 registers a thread for sm_90).
    The interpreter runs programs one by one: 32 inputs a program.
    """
    return block_r or (32 if INTERPRETED else 1), min(block_p or 1024, triton.next_power_of_2(H * W)), 4


def upsampled_range_triton(
    acts: torch.Tensor,
    size: tuple[int, int],
    block_r: int | None = None,
    block_p: int | None = None,
    wide: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract of :func:`upsampled_range_torch`; the up-sampled maps exist only tile by tile.

    ``acts`` is read through its strides (channels-last included, no copy). ``wide`` forces (or
    forbids) int64 offsets within a map; by default they are int64 only where int32 could overflow.

    Raises:
        KernelUnavailable: the kernel could not be built or launched.
    """
    if not HAS_TRITON:
        raise RuntimeError("upsampled_range_triton needs triton; use upsampled_range() to fall back to torch")
    B, K, h, w = acts.shape
    H, W = int(size[0]), int(size[1])
    lo = torch.empty(B * K, device=acts.device, dtype=torch.float32)
    hi = torch.empty_like(lo)
    if B * K == 0:
        return lo.view(B, K), hi.view(B, K)
    block_r, block_p, num_warps = range_blocks(H, W, block_r, block_p)
    if wide is None:
        wide = _wide((h, w, acts.stride(2), acts.stride(3)))
    launch(
        "upsampled_range", _range_kernel, range_grid(B * K, block_r),
        acts, lo, hi, B * K, K, h, w, H * W, W, _scale(h, H), _scale(w, W), *acts.stride(),
        WIDE=wide, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=num_warps,
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
    max_yz: int = MAX_GRID_YZ,
    wide: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contract of :func:`masked_inputs_torch`, built straight into ``out_dtype`` (or into ``out``).

    Up-sampling, min–max, the product with the image and the optional normalisation happen in
    registers: no float32 ``[n, 3, H, W]`` intermediate exists. ``images`` and ``acts`` are read through
    their strides (channels-last activations, as models give them, are not copied). ``channels_last``
    picks the layout of the result (what cuDNN convolutions prefer). ``max_yz`` caps grid axes 1 and 2
    (see :func:`masked_grid`); tests lower it to split row blocks over both at small sizes. ``wide``
    forces (or forbids) int64 offsets within a map or image; by default only where int32 could overflow.

    Raises:
        KernelUnavailable: the kernel could not be built or launched.
    """
    if not HAS_TRITON:
        raise RuntimeError("masked_inputs_triton needs triton; use masked_inputs() to fall back to torch")
    B, K, h, w = acts.shape
    H, W = images.shape[-2:]
    n = int(image_idx.numel())
    block_r, block_p, num_warps = masked_blocks(H, W, block_r, block_p)
    grid = masked_grid(n, H, W, block_r, block_p, max_yz)  # checks the size before allocating for it
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((n, 3, H, W), device=images.device, dtype=out_dtype, memory_format=fmt)
    elif tuple(out.shape) != (n, 3, H, W) or out.device != images.device:
        raise ValueError(f"masked_inputs: out is {tuple(out.shape)} on {out.device}, not {(n, 3, H, W)} on "
                         f"{images.device}")
    if n == 0:
        return out
    if normalize is not None:
        mean = normalize[0].reshape(-1).to(device=images.device, dtype=torch.float32).expand(3).contiguous()
        std = normalize[1].reshape(-1).to(device=images.device, dtype=torch.float32).expand(3).contiguous()
    else:
        mean = std = lo  # never read: NORMALIZE is a compile-time False
    if wide is None:
        wide = _wide(
            (h, w, acts.stride(2), acts.stride(3)),
            (H, W, images.stride(2), images.stride(3)),
            (H, W, out.stride(2), out.stride(3)),
        )
    launch(
        "masked_inputs", _masked_kernel, grid,
        images, acts, image_idx.contiguous(), channel_idx.contiguous(), lo.contiguous(), hi.contiguous(),
        mean, std, out, n, h, w, H * W, W, _scale(h, H), _scale(w, W),
        *images.stride(), *acts.stride(), *out.stride(),
        NORMALIZE=normalize is not None, WIDE=wide, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=num_warps,
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked inputs on the best available path (see :func:`masked_inputs_torch` and :func:`use_triton`).

    On the Triton path the result is channels-last, the layout cuDNN prefers for the forwards. ``out``:
    write into this tensor (a reused chunk buffer, a CUDA graph's static input) instead of a new one.
    """
    if use_triton(images, acts, op="masked_inputs"):
        try:
            return masked_inputs_triton(
                images, acts, image_idx, channel_idx, lo, hi, out_dtype, normalize, channels_last=True, out=out
            )
        except KernelUnavailable as e:
            fall_back("masked_inputs", e)
    return masked_inputs_torch(images, acts, image_idx, channel_idx, lo, hi, out_dtype, normalize, out=out)
