"""The kernels against their torch twins at the shapes other models' CAM layers produce (Triton's interpreter).

ResNet-50 ``layer4`` 2048×7×7, DenseNet-121 ``features``' 1024 channels (ResNet-50 ``layer3``: 1024×14×14),
ConvNeXt-T / Swin-T 768×7×7, ViT-B/16 768×14×14, EfficientNet-B0 at 64² (1280×2×2), and odd ones (one-row
and non-square maps, prime channel counts). Tolerances as in ``tests/test_kernels.py``.
"""

import pytest
import torch

from unioncam.kernels.denoise import denoise_torch
from unioncam.kernels.masks import masked_inputs_torch, upsampled_range_torch

from .test_kernels import (
    MASK_TOL,
    MEAN,
    STD,
    _gradients,
    denoise_mod,
    denoise_triton,
    masked_inputs_triton,
    upsampled_range_triton,
)
from .test_kernels import pytestmark  # noqa: F401  (skipped without triton)

#: The four layer shapes of the README's models. Denoising them through the interpreter (program by
#: program) takes 10–30 s each on 2 cores: those four are ``slow``; the range and mask kernels take seconds.
BIG = [(1, 2048, 7, 7), (1, 1024, 14, 14), (1, 768, 7, 7), (1, 768, 14, 14)]
ODD = [
    (2, 131, 3, 5),  # prime channels, non-square map, two images
    (1, 97, 1, 9),  # a one-row map
    (3, 32, 4, 4),  # the tests' small ViT
]
DENOISE_SHAPES = [pytest.param(s, marks=pytest.mark.slow) for s in BIG] + ODD
MASK_SHAPES = BIG + [(2, 1280, 2, 2)] + ODD  # + EfficientNet-B0 at 64²


def _id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", DENOISE_SHAPES, ids=_id)
def test_denoise_at_model_shapes(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    grads = _gradients(gen, shape)
    acts = torch.randn(shape, generator=gen)
    for theta in (10.0,) if shape in BIG else (10.0, 63.7):
        cam_t, removed_t, pos_t = denoise_torch(grads, acts, theta)
        cam_k, removed_k, pos_k = denoise_triton(grads, acts, theta)
        torch.testing.assert_close(cam_k, cam_t, rtol=1e-5, atol=1e-6)
        assert torch.equal(removed_k, removed_t) and torch.equal(pos_k, pos_t)


@pytest.mark.parametrize("shape", [(2, 13, 3, 5)], ids=_id)
def test_denoise_gpu_tiling_at_odd_shapes(shape, monkeypatch):
    """The tiles a GPU would use (a partial channel block, padded maps), interpreted: slow there, so small
    (tests/test_kernels.py has more)."""
    monkeypatch.setattr(denoise_mod, "INTERPRETED", False)
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    grads, acts = _gradients(gen, shape), torch.randn(shape, generator=gen)
    cam_t, removed_t, pos_t = denoise_torch(grads, acts, 10.0)
    cam_k, removed_k, pos_k = denoise_triton(grads, acts, 10.0)
    torch.testing.assert_close(cam_k, cam_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(removed_k, removed_t) and torch.equal(pos_k, pos_t)


@pytest.mark.parametrize("size", [(16, 16), (37, 51)])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=_id)
def test_upsampled_range_and_masked_inputs_at_model_shapes(shape, size):
    _range_and_masks(shape, size)


@pytest.mark.slow
def test_masked_inputs_of_resnet50_layer4_at_224():
    _range_and_masks((1, 2048, 7, 7), (224, 224), range_channels=64)


def _range_and_masks(shape, size, range_channels=None):
    gen = torch.Generator().manual_seed(sum(shape) * 7 + sum(size))
    B, K = shape[:2]
    acts = torch.randn(shape, generator=gen)
    acts[:, 0] = 0.0  # a constant channel: pruned on both paths
    lo_t, hi_t = upsampled_range_torch(acts, size)
    # At 224² the interpreter takes ~0.05 s a channel: the range of the last channels only (a slice keeps
    # its offset into the big tensor).
    part = acts if range_channels is None else acts[:, -range_channels:]
    lo_k, hi_k = upsampled_range_triton(part, size)
    torch.testing.assert_close(lo_k, lo_t[:, -part.shape[1]:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi_k, hi_t[:, -part.shape[1]:], rtol=1e-6, atol=1e-6)
    if shape[-2:] != (1, 1):
        assert torch.equal(hi_k > lo_k, hi_t[:, -part.shape[1]:] > lo_t[:, -part.shape[1]:])
    # A few masked inputs, last channels included (offsets near the end of a large activation).
    images = torch.rand(B, 3, *size, generator=gen)
    b_idx = torch.tensor([0, B - 1, B - 1, 0])
    k_idx = torch.tensor([1, K - 1, K // 2, K - 2])
    for dtype, normalize in ((torch.float32, None), (torch.bfloat16, (MEAN, STD))):
        args = (images, acts, b_idx, k_idx, lo_t[b_idx, k_idx], hi_t[b_idx, k_idx], dtype, normalize)
        want = masked_inputs_torch(*args)
        got = masked_inputs_triton(*args, channels_last=dtype == torch.bfloat16)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **MASK_TOL[dtype])
