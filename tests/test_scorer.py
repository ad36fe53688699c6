"""The scorer's process-wide settings and its out-of-memory back-off (both GPU-only paths, checked on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unioncam.core import Scorer, backend_flags
from unioncam.core.scorer import _tf32_switches, is_out_of_memory

from .models import make_tiny_cnn

CUDA = torch.device("cuda")


def _state() -> list:
    return [getattr(obj, attr) for obj, attr, _, _ in _tf32_switches()] + [torch.backends.cudnn.benchmark]


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("tf32", True), ("bf16", False), ("fp16", False)])
def test_backend_flags_are_set_for_the_call_and_restored(precision, tf32):
    # The flags are plain attributes: they can be set and read without a GPU.
    before = _state()
    with backend_flags(CUDA, precision):
        inside = _state()
        assert inside[-1] is True  # cuDNN autotuning during the call
        assert inside[:-1] == [on if tf32 else off for _, _, on, off in _tf32_switches()]
    assert _state() == before
    with pytest.raises(KeyError):  # restored on the way out of an error too
        with backend_flags(CUDA, precision):
            raise KeyError("boom")
    assert _state() == before


def test_caller_choices_survive_an_explanation_context():
    obj, attr, on, off = _tf32_switches()[1]
    saved, bench = getattr(obj, attr), torch.backends.cudnn.benchmark
    try:
        setattr(obj, attr, on)  # the caller wants TF32 convolutions and no autotuning
        torch.backends.cudnn.benchmark = False
        with backend_flags(CUDA, "fp32"):
            assert getattr(obj, attr) == off
        assert getattr(obj, attr) == on and torch.backends.cudnn.benchmark is False
    finally:
        setattr(obj, attr, saved)
        torch.backends.cudnn.benchmark = bench


def test_cpu_calls_touch_no_flag():
    before = _state()
    with backend_flags(torch.device("cpu"), "tf32"):
        assert _state() == before


class _Fussy(nn.Module):
    """Wraps a model; any forward of more than ``limit`` inputs fails as an allocator would."""

    def __init__(self, model: nn.Module, limit: int, error: BaseException) -> None:
        super().__init__()
        self.model, self.limit, self.error, self.sizes = model, limit, error, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error
        return self.model(x)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
])
def test_out_of_memory_backs_off_to_smaller_chunks_with_the_same_scores(error):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(13, 3, 16, 16, generator=g)
    targets = torch.randint(0, 10, (13,), generator=g)
    model = make_tiny_cnn()
    expected = Scorer(model, batch_size=13).images(x, targets)
    fussy = _Fussy(model, limit=3, error=error)
    got = Scorer(fussy, batch_size=16).images(x, targets)
    assert torch.allclose(got, expected, atol=1e-6)
    assert fussy.sizes[:3] == [13, 6, 3] and set(fussy.sizes[3:]) <= {3, 1}  # halved until it fit, then kept


def test_other_errors_are_not_swallowed():
    fussy = _Fussy(make_tiny_cnn(), limit=0, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Scorer(fussy, batch_size=4).images(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    assert fussy.sizes == [4]  # tried once, no back-off
    assert not is_out_of_memory(ValueError("out of memory"))  # only runtime errors from an allocator


def test_a_single_input_that_does_not_fit_raises():
    fussy = _Fussy(make_tiny_cnn(), limit=0, error=torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        Scorer(fussy, batch_size=4).images(torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    assert fussy.sizes == [2, 1]


def test_cpu_chunk_size_follows_the_image_size():
    from unioncam.core import default_batch_size

    cpu = torch.device("cpu")
    sizes = {s: default_batch_size(cpu, (s, s)) for s in (16, 32, 64, 112, 224, 448)}
    assert sizes == {16: 64, 32: 64, 64: 32, 112: 16, 224: 8, 448: 8}
    assert default_batch_size(CUDA, (224, 224)) == 64 and default_batch_size(cpu) == 8


def test_emulated_half_precision_warns_on_cpus_without_it(monkeypatch):
    from unioncam.core import scorer as sc

    model = make_tiny_cnn()
    monkeypatch.setattr(sc, "cpu_has_native", lambda dtype: False)
    with pytest.warns(RuntimeWarning, match="without bf16 instructions"):
        Scorer(model, precision="bf16")
    monkeypatch.setattr(sc, "cpu_has_native", lambda dtype: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Scorer(model, precision="bf16")
        Scorer(model, precision="fp32")
