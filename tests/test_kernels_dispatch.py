"""Dispatch between each op's Triton kernel and its torch twin: the ``UNIONCAM_TRITON`` switch and the
fall-back when a kernel cannot be built or launched.

There are no CUDA tensors here, so the tests make dispatch treat CPU tensors as GPU ones
(``_triton.on_gpu``); what runs behind it is the real public function, its real error handling and,
where a kernel does run, Triton's interpreter.
"""

import importlib
import warnings

import pytest
import torch

from unioncam.kernels import _triton, denoise, masked_inputs, upsampled_range
from unioncam.kernels.denoise import denoise_torch
from unioncam.kernels.masks import masked_inputs_torch, upsampled_range_torch

denoise_mod = importlib.import_module("unioncam.kernels.denoise")
masks_mod = importlib.import_module("unioncam.kernels.masks")

pytestmark = pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")

#: Triton's own message when it cannot build a kernel's launcher (triton/runtime/build.py).
NO_CC = "Failed to find C compiler. Please specify via CC environment variable."


class FailingKernel:
    """Stands in for a jit kernel whose launcher cannot be built: ``kernel[grid](...)`` raises."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            raise RuntimeError(NO_CC)

        return run


class CountingKernel:
    """Wraps a jit kernel and counts its launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            return self.kernel[grid](*args, **kwargs)

        return run


def _inputs(op: str):
    """``(module, kernel attribute, public function, twin, args)`` of ``op`` on fresh random inputs."""
    gen = torch.Generator().manual_seed(len(op))
    acts = torch.randn(2, 5, 4, 3, generator=gen)
    if op == "denoise":
        grads = torch.randn(2, 5, 4, 3, generator=gen)
        return denoise_mod, "_denoise_kernel", denoise, denoise_torch, (grads, acts, 25.0)
    if op == "upsampled_range":
        return masks_mod, "_range_kernel", upsampled_range, upsampled_range_torch, (acts, (9, 7))
    images = torch.rand(2, 3, 9, 7, generator=gen)
    lo, hi = upsampled_range_torch(acts, (9, 7))
    b, k = torch.tensor([1, 0, 1]), torch.tensor([4, 2, 0])
    args = (images, acts, b, k, lo[b, k], hi[b, k])
    return masks_mod, "_masked_kernel", masked_inputs, masked_inputs_torch, args


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


@pytest.fixture
def as_on_gpu(monkeypatch):
    """Dispatch as for CUDA tensors, no switch set, and no kernel failed yet in this process."""
    monkeypatch.setattr(_triton, "on_gpu", lambda *tensors: True)
    monkeypatch.setattr(_triton, "_FAILED", {})
    monkeypatch.delenv(_triton.SWITCH, raising=False)


OPS = ["denoise", "upsampled_range", "masked_inputs"]


def test_switch_is_read_at_every_call(as_on_gpu, monkeypatch):
    x = torch.zeros(1)
    assert _triton.use_triton(x, op="denoise")
    monkeypatch.setenv("UNIONCAM_TRITON", "0")
    assert not _triton.use_triton(x, op="denoise") and not _triton.triton_enabled()
    monkeypatch.setenv("UNIONCAM_TRITON", "1")
    assert _triton.use_triton(x, op="denoise")


@pytest.mark.parametrize("op", OPS)
def test_switch_forces_the_twin(op, as_on_gpu, monkeypatch):
    mod, name, public, twin, args = _inputs(op)
    kernel = FailingKernel()
    monkeypatch.setattr(mod, name, kernel)
    monkeypatch.setenv("UNIONCAM_TRITON", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the twin is chosen up front: nothing to warn about
        got = public(*args)
    assert kernel.launches == 0
    assert _equal(got, twin(*args))
    assert _triton._FAILED == {}


@pytest.mark.parametrize("op", OPS)
def test_build_failure_falls_back_with_one_warning(op, as_on_gpu, monkeypatch):
    mod, name, public, twin, args = _inputs(op)
    kernel = FailingKernel()
    monkeypatch.setattr(mod, name, kernel)
    with pytest.warns(RuntimeWarning) as record:
        first = public(*args)
    assert len(record) == 1
    message = str(record[0].message)
    assert op in message and NO_CC in message and "UNIONCAM_TRITON=0" in message
    assert kernel.launches == 1
    assert _equal(first, twin(*args))  # the twin's result, not a partial kernel one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = public(*args)
    assert kernel.launches == 1  # straight to the twin: the kernel is not tried again
    assert _equal(second, first)
    assert set(_triton._FAILED) == {op}
    assert all(_triton.use_triton(torch.zeros(1), op=other) for other in OPS if other != op)


def test_errors_outside_the_launch_are_not_swallowed(as_on_gpu, monkeypatch):
    # Only a failure to build or launch a kernel falls back; an input the kernel cannot take is the
    # caller's error, raised before anything is launched (or allocated).
    mod, name, public, twin, (images, acts, *rest) = _inputs("masked_inputs")
    kernel = FailingKernel()
    monkeypatch.setattr(mod, name, kernel)
    huge = images[:, :, :1, :1].expand(2, 3, 50_000, 50_000)  # 2.5e9 pixels, over 2**31: a view, no memory
    with pytest.raises(ValueError, match="2\\*\\*31 pixels"):
        public(huge, acts, *rest)
    assert kernel.launches == 0 and _triton._FAILED == {}


@pytest.mark.skipif(not _triton.INTERPRETED, reason="CPU tensors reach a kernel only through the interpreter")
@pytest.mark.parametrize("op", OPS)
def test_kernel_runs_when_dispatch_allows(op, as_on_gpu, monkeypatch):
    mod, name, public, twin, args = _inputs(op)
    kernel = CountingKernel(getattr(mod, name))
    monkeypatch.setattr(mod, name, kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = public(*args)
    assert kernel.launches == 1
    want = twin(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_take_the_twin(op, monkeypatch):
    # Without the GPU stand-in, CPU tensors never reach a kernel: the public function is the twin exactly.
    mod, name, public, twin, args = _inputs(op)
    kernel = CountingKernel(getattr(mod, name))
    monkeypatch.setattr(mod, name, kernel)
    got, want = public(*args), twin(*args)
    assert kernel.launches == 0
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
