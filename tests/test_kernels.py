"""Each Triton kernel against its torch twin, on fresh random inputs, run by Triton's interpreter on CPU.

Tolerances (kernel vs twin, both computing in float32):
- ``denoise``: map ``rtol=1e-5, atol=1e-6`` (the channel sum runs in another order); the removed
  fractions are counts, so they must be equal exactly. Half-precision inputs are cast to float32 by both.
- ``upsampled_range``: ``rtol=1e-6, atol=1e-6`` (same bilinear arithmetic, fma contraction may differ).
- ``masked_inputs``: float32 ``rtol=1e-5, atol=1e-5``; bfloat16 one unit in the last place
  (``rtol=2**-7``), float16 likewise (``rtol=2**-10``), ``atol=1e-5`` for values rounding near zero.
"""

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import unioncam
from unioncam.kernels import _triton
from unioncam.kernels.denoise import denoise_torch
from unioncam.kernels.masks import masked_inputs_torch, upsampled_range_torch

from .conftest import make_tiny_cnn

# The package re-exports functions named like these modules; the modules themselves are what dispatch.
denoise_mod = importlib.import_module("unioncam.kernels.denoise")
masks_mod = importlib.import_module("unioncam.kernels.masks")

#: Where the kernels run. Default: CPU tensors through Triton's interpreter. On a GPU machine:
#: ``UNIONCAM_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/test_kernels.py`` runs the same tests
#: on compiled kernels (inputs made on the CPU, moved there; results brought back to compare).
DEVICE = torch.device(os.environ.get("UNIONCAM_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and _triton.INTERPRETED:
    raise RuntimeError("UNIONCAM_TEST_DEVICE=cuda needs TRITON_INTERPRET=0: the interpreter compiles nothing")


def _on_device(kernel):
    """``kernel`` called with every tensor argument on :data:`DEVICE`, its results back on the CPU."""

    def move(x, where):
        if isinstance(x, torch.Tensor):
            return x.to(where)
        if isinstance(x, tuple):
            return tuple(move(v, where) for v in x)
        return x

    def run(*args, **kwargs):
        out = kernel(*(move(a, DEVICE) for a in args), **{k: move(v, DEVICE) for k, v in kwargs.items()})
        return move(out, "cpu")

    return run


denoise_triton = _on_device(denoise_mod.denoise_triton)
upsampled_range_triton = _on_device(masks_mod.upsampled_range_triton)
masked_inputs_triton = _on_device(masks_mod.masked_inputs_triton)

pytestmark = pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")

MASK_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _gradients(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Gradients shaped like VGG's: many exact zeros, ties, both signs, some degenerate channels."""
    g = torch.randn(shape, generator=gen)
    g[torch.rand(shape, generator=gen) < 0.6] = 0.0  # mostly zero, as behind a max-pool
    K = shape[1]
    g[:, 0] = 0.0  # all-zero channel
    if K > 1:
        g[:, 1] = 0.75  # constant positive channel
    if K > 2:
        g[:, 2] = -0.5  # constant negative channel
    if K > 3:
        g[:, 3] = torch.randint(-2, 3, g[:, 3].shape, generator=gen).float() / 4  # heavy ties
    if K > 4:
        g[:, 4] = -g[:, 4].abs()  # all non-positive
        g[:, 4, 0] = -0.0  # negative zeros must order like zeros
    return g


@pytest.mark.parametrize("theta", [0.0, 10.0, 37.3, 50.0, 100.0])
@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (2, 37, 5, 7), (1, 70, 3, 3), (3, 9, 14, 14)])
def test_denoise_kernel_matches_twin(shape, theta):
    gen = torch.Generator().manual_seed(hash((shape, theta)) % 2**31)
    grads = _gradients(gen, shape)
    acts = torch.randn(shape, generator=gen)  # pre-ReLU layers give negative activations too
    cam_t, removed_t, pos_t = denoise_torch(grads, acts, theta)
    cam_k, removed_k, pos_k = denoise_triton(grads, acts, theta)
    torch.testing.assert_close(cam_k, cam_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(removed_k, removed_t)
    assert torch.equal(pos_k, pos_t)


def test_denoise_kernel_threshold_is_exact_percentile():
    # One channel, values 0..9 shuffled: the 25th percentile is 2.25, so 0, 1, 2 are removed and the
    # weighted map keeps 3..9 with α = 1/(3+…+9) = 1/42.
    vals = torch.tensor([7.0, 2.0, 9.0, 0.0, 5.0, 1.0, 8.0, 3.0, 6.0, 4.0]).view(1, 1, 2, 5)
    acts = torch.ones_like(vals)
    cam, removed, removed_pos = denoise_triton(vals, acts, 25.0)
    expected = torch.where(vals >= 2.25, vals, 0.0) / 42.0
    torch.testing.assert_close(cam, expected[:, 0], rtol=1e-6, atol=0)
    assert removed.item() == pytest.approx(0.3)
    assert removed_pos.item() == pytest.approx(2 / 9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_denoise_kernel_half_inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    grads = _gradients(gen, (2, 11, 6, 5)).to(dtype)
    acts = torch.rand(2, 11, 6, 5, generator=gen).to(dtype)
    cam_t, removed_t, _ = denoise_torch(grads, acts, 10.0)
    cam_k, removed_k, _ = denoise_triton(grads, acts, 10.0)
    torch.testing.assert_close(cam_k, cam_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(removed_k, removed_t)


@pytest.mark.parametrize(
    "shape,size",
    [((2, 5, 3, 4), (17, 13)), ((1, 33, 7, 7), (64, 64)), ((1, 4, 5, 5), (5, 5)), ((2, 3, 9, 6), (4, 5)),
     ((1, 3, 1, 1), (8, 8))],
)
def test_upsampled_range_kernel_matches_twin(shape, size):
    gen = torch.Generator().manual_seed(sum(shape) + sum(size))
    acts = torch.randn(shape, generator=gen)
    acts[:, 0] = 0.0  # all-zero channel stays exactly constant: pruned on both paths
    lo_t, hi_t = upsampled_range_torch(acts, size)
    lo_k, hi_k = upsampled_range_triton(acts, size)
    torch.testing.assert_close(lo_k, lo_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi_k, hi_t, rtol=1e-6, atol=1e-6)
    if shape[-2:] == (1, 1):  # up-sampled, a 1×1 map is constant: any range is a rounding wobble (pruned anyway)
        for lo, hi in ((lo_k, hi_k), (lo_t, hi_t)):
            assert ((hi - lo) <= 1e-6 * lo.abs().clamp_min(1)).all()
    else:
        assert torch.equal(hi_k > lo_k, hi_t > lo_t)
    assert torch.equal(lo_k[:, 0], torch.zeros_like(lo_k[:, 0])) and torch.equal(hi_k[:, 0], lo_k[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape,size", [((2, 6, 3, 4), (17, 13)), ((1, 9, 7, 7), (40, 40)), ((2, 4, 6, 6), (6, 6))])
def test_masked_inputs_kernel_matches_twin(shape, size, dtype, normalize):
    gen = torch.Generator().manual_seed(sum(shape) * 31 + sum(size) + normalize)
    B, K = shape[:2]
    acts = torch.randn(shape, generator=gen)
    images = torch.rand(B, 3, *size, generator=gen)
    lo, hi = upsampled_range_torch(acts, size)
    # A random subset of pairs, out of order, with repeats: chunks in the engine are arbitrary slices.
    pick = torch.randint(0, B * K, (2 * B * K // 3 + 1,), generator=gen)
    b_idx, k_idx = pick // K, pick % K
    args = (images, acts, b_idx, k_idx, lo[b_idx, k_idx], hi[b_idx, k_idx], dtype, (MEAN, STD) if normalize else None)
    want = masked_inputs_torch(*args)
    got = masked_inputs_triton(*args, channels_last=dtype == torch.bfloat16)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **MASK_TOL[dtype])


def test_gpu_launch_configurations_match_twins(monkeypatch):
    # The interpreter normally gets large blocks (it runs programs one by one); here each launcher picks
    # the blocks it would pick on a GPU, so those exact tilings (partial blocks, padding rows) are checked.
    monkeypatch.setattr(denoise_mod, "INTERPRETED", False)
    monkeypatch.setattr(masks_mod, "INTERPRETED", False)
    assert denoise_mod.denoise_blocks(512, 196)[:2] == (4, 256)
    assert masks_mod.range_blocks(224, 224)[:2] == (4, 512)
    assert masks_mod.masked_blocks(224, 224)[:2] == (1, 1024)
    gen = torch.Generator().manual_seed(11)
    for shape, theta in (((2, 9, 14, 14), 10.0), ((1, 6, 33, 35), 50.0)):  # 3 blocks, 1 partial; wide rows
        grads, acts = _gradients(gen, shape), torch.randn(shape, generator=gen)
        want, got = denoise_torch(grads, acts, theta), denoise_triton(grads, acts, theta)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    acts = torch.randn(2, 7, 5, 6, generator=gen)
    images = torch.rand(2, 3, 45, 37, generator=gen)  # 1665 pixels: 4 pixel blocks of 512, 2 of 1024
    lo, hi = upsampled_range_torch(acts, (45, 37))
    lo_k, hi_k = upsampled_range_triton(acts, (45, 37))
    torch.testing.assert_close(lo_k, lo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi_k, hi, rtol=1e-6, atol=1e-6)
    b_idx, k_idx = torch.tensor([1, 0, 1, 0, 1]), torch.tensor([6, 0, 2, 5, 6])
    args = (images, acts, b_idx, k_idx, lo[b_idx, k_idx], hi[b_idx, k_idx], torch.bfloat16, (MEAN, STD))
    got = masked_inputs_triton(*args, channels_last=True)
    torch.testing.assert_close(got.float(), masked_inputs_torch(*args).float(), **MASK_TOL[torch.bfloat16])


def test_kernels_compile_for_hopper(tmp_path):
    # The interpreter never lowers a kernel. Triton's compiler can, without a GPU: every launch of a
    # VGG16 explanation is built for sm_90 (H100/H200), at every layer's shape, and none may spill
    # registers to the stack (AMD kept a whole channel in registers and spilled from 112² on).
    ptxas = Path(_triton.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip(f"this Triton install has no ptxas ({ptxas})")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "TRITON_CACHE_DIR": str(tmp_path)}  # an empty cache: really compile
    run = subprocess.run([sys.executable, "-m", "unioncam.kernels.compile_check", "--arch", "90", "--json"],
                         capture_output=True, text=True, env=env, timeout=900,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout)
    assert {b["kernel"] for b in built} == {"denoise", "upsampled_range", "masked_inputs"}
    # Every VGG16 layer shape at 224² (features.2 … features.30) for AMD, the 224² up-sampling kernels.
    layers = {b["config"].split()[0] for b in built if b["kernel"] == "denoise"}
    assert {"features.2", "features.9", "features.16", "features.23", "features.29"} <= layers
    assert len(built) == 22
    for b in built:
        assert b["cubin_bytes"] > 0 and b["registers"] is not None, b
        assert b["registers"] <= 128 and b["stack_bytes"] == 0, b


def test_masked_inputs_kernel_layout_and_empty():
    gen = torch.Generator().manual_seed(3)
    acts = torch.rand(1, 3, 4, 4, generator=gen)
    images = torch.rand(1, 3, 9, 9, generator=gen)
    lo, hi = upsampled_range_torch(acts, (9, 9))
    idx = torch.tensor([0, 0]), torch.tensor([2, 1])
    out = masked_inputs_triton(images, acts, *idx, lo[idx], hi[idx], channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, masked_inputs_torch(images, acts, *idx, lo[idx], hi[idx]), **MASK_TOL[torch.float32])
    none = torch.zeros(0, dtype=torch.long)
    assert masked_inputs_triton(images, acts, none, none, lo[0, :0], hi[0, :0]).shape == (0, 3, 9, 9)


@pytest.mark.parametrize(
    "hw,channels,theta,gpu_blocks",
    [((7, 7), 6, 10.0, True), ((14, 14), 6, 63.7, True), ((28, 28), 6, 10.0, True), ((56, 56), 6, 63.7, False),
     ((112, 112), 2, 10.0, False), ((112, 112), 1, 63.7, True), ((13, 17), 6, 37.3, True), ((13, 17), 6, 90.0, False)],
)
def test_denoise_kernel_streams_maps_of_any_size(hw, channels, theta, gpu_blocks, monkeypatch):
    # The kernel streams each channel tile by tile; the percentile stays exact (counts equal the twin's)
    # at every size, with the interpreter's tiles and with the GPU's (1024 values: 112² takes 13 tiles,
    # the last one partial; 13×17 pads). Few channels keep the interpreter quick.
    if gpu_blocks:
        monkeypatch.setattr(denoise_mod, "INTERPRETED", False)
    gen = torch.Generator().manual_seed(hw[0] * 1000 + hw[1])
    shape = (2 if hw == (13, 17) else 1, 6, *hw)
    grads = _gradients(gen, shape)[:, 6 - channels :]  # the last channels: non-positive and plain random
    acts = torch.randn(grads.shape, generator=gen)
    cam_t, removed_t, pos_t = denoise_torch(grads, acts, theta)
    cam_k, removed_k, pos_k = denoise_triton(grads, acts, theta)
    torch.testing.assert_close(cam_k, cam_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(removed_k, removed_t)
    assert torch.equal(pos_k, pos_t)


def test_denoise_blocks_hold_a_fixed_tile(monkeypatch):
    # Registers follow the tile, not h·w: on a GPU a tile never holds more than 1024 values.
    monkeypatch.setattr(denoise_mod, "INTERPRETED", False)
    for K, h in ((64, 224), (128, 112), (256, 56), (512, 28), (512, 14), (512, 7), (3, 1)):
        block_k, block_n, warps = denoise_mod.denoise_blocks(K, h * h)
        assert block_k * block_n <= 1024 and warps == 4, (K, h)
    assert denoise_mod.denoise_blocks(64, 224 * 224)[:2] == (1, 1024)


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    # CUDA launches at most 2**31 − 1 programs on grid axis 0 and 65,535 on axes 1 and 2. Before, the
    # pixel blocks of masked_inputs sat on axis 1: images over ~67 MP (⌈H·W/1024⌉ > 65,535) could not
    # launch. Now pixel blocks go on axis 0 and masked inputs are split over axes 1 and 2.
    monkeypatch.setattr(masks_mod, "INTERPRETED", False)
    for n, H, W in ((70_000, 10_000, 10_000), (70_000, 224, 224), (1, 1, 1), (65_535, 8_200, 8_200),
                    (5_000_000, 20_000, 30_000)):
        block_r, block_p, _ = masks_mod.masked_blocks(H, W)
        grid = masks_mod.masked_grid(n, H, W, block_r, block_p)
        assert len(grid) == 3 and grid[0] <= _triton.MAX_GRID_X, grid
        assert max(grid[1:]) <= _triton.MAX_GRID_YZ and min(grid) >= 1, grid
        assert grid[0] * block_p >= H * W  # every pixel
        row_blocks = -(-n // block_r)
        assert row_blocks <= grid[1] * grid[2] < row_blocks + grid[2]  # every masked input, little idle
    assert masks_mod.masked_grid(70_000, 10_000, 10_000, 1, 1024) == (97_657, 35_000, 2)
    for rows in (70_000, 64 * 512 * 200):  # B·K maps of upsampled_range
        block_r = masks_mod.range_blocks(224, 224)[0]
        (programs,) = masks_mod.range_grid(rows, block_r)
        assert programs * block_r >= rows and programs <= _triton.MAX_GRID_X
    with pytest.raises(ValueError):
        masks_mod.masked_grid(1, 50_000, 50_000, 1, 1024)  # over 2**31 pixels


def test_wide_offsets_are_picked_where_int32_overflows():
    # (rows, cols, row stride, col stride) of one map or image: int64 offsets only where needed.
    assert not masks_mod._wide((14, 14, 14 * 512, 512), (224, 224, 224, 1))  # VGG16, channels-last maps
    assert masks_mod._wide((10_000, 10_000, 10_000 * 64, 64))  # features.2 of a 10000² image, channels-last
    assert not masks_mod._wide((10_000, 10_000, 10_000, 1))  # the same image's pixels, one colour plane


@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_inputs_split_over_grid_axes_and_wide_match_twin(channels_last):
    # With axes 1 and 2 capped at 3 programs, 7 masked inputs take a 3 × 3 split (two programs idle):
    # the same tiling a launch of more than 65,535 masked inputs gets. Then the int64 (WIDE) variant.
    gen = torch.Generator().manual_seed(5 + channels_last)
    acts = torch.randn(2, 5, 6, 4, generator=gen)
    images = torch.rand(2, 3, 19, 23, generator=gen)
    if channels_last:
        acts = acts.to(memory_format=torch.channels_last)
    lo, hi = upsampled_range_torch(acts, (19, 23))
    b_idx, k_idx = torch.tensor([1, 0, 1, 1, 0, 0, 1]), torch.tensor([4, 0, 2, 1, 3, 4, 0])
    args = (images, acts, b_idx, k_idx, lo[b_idx, k_idx], hi[b_idx, k_idx], torch.float32, (MEAN, STD))
    want = masked_inputs_torch(*args)
    assert masks_mod.masked_grid(7, 19, 23, 1, 512, max_yz=3) == (1, 3, 3)
    got = masked_inputs_triton(*args, block_r=1, max_yz=3)
    torch.testing.assert_close(got, want, **MASK_TOL[torch.float32])
    got = masked_inputs_triton(*args, wide=True, channels_last=True)
    torch.testing.assert_close(got, want, **MASK_TOL[torch.float32])
    lo_k, hi_k = upsampled_range_triton(acts, (19, 23), wide=True)
    torch.testing.assert_close(lo_k, lo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi_k, hi, rtol=1e-6, atol=1e-6)


class _Recording:
    """Wraps a jit kernel: records the arguments of each launch, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.args = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.args.append(args)
            return self.kernel[grid](*args, **kwargs)

        return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_kernels_read_channels_last_activations_without_copy(dtype, normalize, monkeypatch):
    # Models give activations channels-last: the kernels read them through their strides, the twin
    # gathers the selected maps; results equal each other and the contiguous-input results.
    gen = torch.Generator().manual_seed(17 + normalize)
    acts_c = torch.randn(2, 7, 5, 6, generator=gen)
    acts = acts_c.to(memory_format=torch.channels_last)
    assert acts.stride(1) == 1 and not acts.is_contiguous()
    images = torch.rand(2, 3, 29, 31, generator=gen).to(memory_format=torch.channels_last)
    lo, hi = upsampled_range_torch(acts, (29, 31))
    assert torch.equal(lo, upsampled_range_torch(acts_c, (29, 31))[0])
    masked = _Recording(masks_mod._masked_kernel)
    ranged = _Recording(masks_mod._range_kernel)
    monkeypatch.setattr(masks_mod, "_masked_kernel", masked)
    monkeypatch.setattr(masks_mod, "_range_kernel", ranged)
    lo_k, hi_k = upsampled_range_triton(acts, (29, 31))
    torch.testing.assert_close(lo_k, lo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi_k, hi, rtol=1e-6, atol=1e-6)
    pick = torch.randint(0, 14, (9,), generator=gen)
    b_idx, k_idx = pick // 7, pick % 7
    args = (images, acts, b_idx, k_idx, lo[b_idx, k_idx], hi[b_idx, k_idx], dtype, (MEAN, STD) if normalize else None)
    want = masked_inputs_torch(*args)
    torch.testing.assert_close(masked_inputs_torch(images.contiguous(), acts_c, *args[2:]), want, rtol=0, atol=0)
    got = masked_inputs_triton(*args, channels_last=True)
    torch.testing.assert_close(got.float(), want.float(), **MASK_TOL[dtype])
    if DEVICE.type == "cpu":  # the very tensors were launched on: no contiguous copy was made
        assert ranged.args[0][0] is acts
        assert masked.args[0][0] is images and masked.args[0][1] is acts


# ------------------------------------------------------------------ the engine with kernels dispatched on


class NormalizedTiny(nn.Module):
    """A pixel-space tiny CNN that, like PixelVGG16, normalises first and offers ``forward_normalized``."""

    default_layer = "net.conv2"

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.net = make_tiny_cnn(seed)
        self.register_buffer("mean", MEAN.clone())
        self.register_buffer("std", STD.clone())

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _route_to_kernels(monkeypatch) -> dict[str, int]:
    """Route every op to its Triton kernel (CPU tensors: interpreted) and count the launches."""
    calls = {"denoise": 0, "range": 0, "masked": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.delenv(_triton.SWITCH, raising=False)
    monkeypatch.setattr(_triton, "_FAILED", {})
    if DEVICE.type == "cpu":  # on a GPU, dispatch picks the kernels for CUDA tensors by itself
        monkeypatch.setattr(_triton, "on_gpu", lambda *tensors: True)
    monkeypatch.setattr(denoise_mod, "denoise_triton", counted("denoise", denoise_mod.denoise_triton))
    monkeypatch.setattr(masks_mod, "upsampled_range_triton", counted("range", masks_mod.upsampled_range_triton))
    monkeypatch.setattr(masks_mod, "masked_inputs_triton", counted("masked", masks_mod.masked_inputs_triton))
    return calls


@pytest.mark.parametrize("method,normalized", [("unioncam", True), ("scorecam", False)])
def test_engine_with_kernels_matches_engine_with_twins(method, normalized, monkeypatch):
    model = NormalizedTiny(seed=4) if normalized else make_tiny_cnn(seed=4)
    gen = torch.Generator().manual_seed(11)
    images = [torch.rand(3, 21, 18, generator=gen) for _ in range(2)]
    twins = unioncam.explain_batch(model, images, method=method, batch_size=7)
    calls = _route_to_kernels(monkeypatch)
    fused = unioncam.explain_batch(copy.deepcopy(model).to(DEVICE), images, method=method, batch_size=7)
    assert calls["range"] >= 1 and calls["masked"] >= 1 and calls["denoise"] == (method == "unioncam")
    for a, b in zip(twins, fused):
        assert a.target == b.target
        # The spec's fast-path tolerance: ≤ 1e-4 on [0, 1] maps, same selection. Kernel rounding (~1e-7 on
        # the masked inputs) moves this model's sharp softmax scores by ~1e-6, and the union map's
        # normalisation can amplify that to ~3e-5 where β_den·Lh_den and β_reg·Lh_reg nearly cancel.
        torch.testing.assert_close(b.saliency.cpu(), a.saliency, rtol=0, atol=1e-4)
        assert a.details["active_channels"] == b.details["active_channels"]
        if method == "unioncam":
            assert a.details["selected"] == b.details["selected"]
            assert a.details["denoised_fraction"] == b.details["denoised_fraction"]
            for key in ("beta_denoise", "beta_region", "beta_union"):
                assert b.details[key] == pytest.approx(a.details[key], abs=1e-5)


def test_package_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, unioncam\n"
        "from unioncam.kernels import _triton\n"
        "assert not _triton.HAS_TRITON\n"
        "sys.path.insert(0, 'tests'); from models import make_tiny_cnn\n"
        "r = unioncam.explain(make_tiny_cnn(), torch.rand(3, 16, 16))\n"
        "print(r.details['selected'])\n"
    )
    env_root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=env_root, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": env_root})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in ("union", "region")
