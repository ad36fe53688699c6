"""The one scoring loop: ``f_c(z)`` for many inputs, in chunks, at a chosen precision.

Every forward over many inputs — the region map's masked inputs, UnionCAM's β's, Group-CAM's groups,
the metrics and the insertion/deletion curves — goes through :class:`Scorer`: chunks of
``batch_size`` on the model's device, channels-last, an out-of-memory back-off, the precision's backend
flags, and a float32 softmax with no host sync per chunk.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import PRECISIONS, validate_batch_size, validate_precision
from .capture import model_device, model_dtype
from .fast import FastPath, Runner, cast_params, engine, head_of, resolve_fast

__all__ = ["DEFAULT_BATCH_SIZE", "PRECISIONS", "Scorer", "backend_flags", "cpu_has_native", "default_batch_size",
           "is_out_of_memory", "resolve_precision", "use_device"]

#: Masked inputs per forward when ``batch_size`` is not given, at 224×224. A GPU needs large batches to fill
#: up; a CPU is compute-bound at any batch size (VGG16 at 224²: 198–215 ms per image for batches of 1–32 on
#: 2 cores) and large batches only spill caches, so it gets small ones.
DEFAULT_BATCH_SIZE = {"cuda": 64, "cpu": 8}

#: On a CPU, pixels per forward when ``batch_size`` is not given: 8 images at 224², more at smaller sizes,
#: where a forward per few images is mostly fixed overhead (VGG16 fp32 at 64² on a 2-core Xeon: 32.5 ms
#: per image in batches of 8, 23.2 ms in batches of 64; at 112² and 224² batches of 8–16 were fastest).
CPU_PIXELS_PER_FORWARD = 16 * 112 * 112
CPU_MAX_BATCH = 64


def default_batch_size(device: torch.device, size: tuple[int, int] | None = None) -> int:
    """Masked inputs per forward on ``device`` for images of ``size`` when the caller gives none."""
    if device.type != "cpu" or size is None:
        return DEFAULT_BATCH_SIZE.get(device.type, 64)
    fit = CPU_PIXELS_PER_FORWARD // max(1, size[0] * size[1])
    # A power of two between the 224² default and the cap: few distinct chunk shapes.
    return max(DEFAULT_BATCH_SIZE["cpu"], min(CPU_MAX_BATCH, 1 << max(0, fit.bit_length() - 1)))


_HALF_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
               torch.float16: ("avx512_fp16", "amx_fp16", "fphp", "asimdhp")}


@functools.lru_cache(maxsize=None)
def cpu_has_native(dtype: torch.dtype) -> bool | None:
    """Whether this CPU has instructions for ``dtype`` maths (``/proc/cpuinfo``); ``None`` where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & set(_HALF_FLAGS.get(dtype, ())))


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision an explanation on ``device`` runs at: ``precision`` itself, or for ``"auto"``:

    - CUDA: ``bf16`` where the GPU has bf16 maths (Ampere and newer), else ``fp16``;
    - a CPU with native bf16 instructions (avx512_bf16, AMX, Arm bf16): ``bf16``;
    - anything else (a CPU where torch would emulate bf16, MPS, ...): strict ``fp32``.

    Half precision changes only the masked forwards' rounding: the gradient pass, the model's head, every
    softmax and UnionCAM's β/AMS forwards stay float32, so the selected map is the one strict fp32 selects
    and bf16 maps agree with strict fp32 ones (Pearson ≥ 0.999 on the benchmarks of
    ``benchmarks/bench_precision.py``). ``precision="fp32"`` is strict float32 everywhere.
    """
    precision = validate_precision(precision)
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native(torch.bfloat16):
        return "bf16"
    return "fp32"


def _warn_if_emulated(device: torch.device, dtype: torch.dtype | None) -> None:
    if device.type == "cpu" and dtype is not None and cpu_has_native(dtype) is False:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        warnings.warn(f"precision={name!r} on a CPU without {name} instructions ({'/'.join(_HALF_FLAGS[dtype][:2])}): "
                      "torch emulates it, several times slower than fp32 here. Use precision='fp32' on this CPU.",
                      RuntimeWarning, stacklevel=3)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors a smaller chunk can avoid: torch's OOM and the allocators' own messages."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUDNN_STATUS_ALLOC_FAILED" in text
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _tf32_switches() -> list[tuple[Any, str, Any, Any]]:
    """``(object, attribute, TF32 on, TF32 off)`` for CUDA's float32 convolutions and matmuls.

    Torch ≥ 2.9 has per-backend ``fp32_precision`` settings and refuses to read the legacy
    ``allow_tf32`` flags once they disagree, so the new settings are used where they exist.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "tf32", "ieee"),
                (conv, "fp32_precision", "tf32", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", True, False), (torch.backends.cudnn, "allow_tf32", True, False)]


def _off_current(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device other than the current one."""
    return device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index


def use_device(device: torch.device | str) -> None:
    """Make a CUDA ``device`` the process's current device (nothing for others).

    Triton launches its kernels on the current device and a CUDA graph is captured on the current
    device's stream, whatever device the tensors live on: a server worker given GPU 1 sets it once at
    start-up. (:func:`backend_flags` enters the model's device for one call where it is not current.)
    """
    device = torch.device(device)
    if _off_current(device):
        torch.cuda.set_device(device)


@contextlib.contextmanager
def backend_flags(device: torch.device, precision: str) -> Iterator[None]:
    """The process-wide backend flags an explanation needs, set for the call and restored after.

    ``fp32`` is strict float32: TF32 off for cuDNN convolutions and cuBLAS matmuls (torch turns it on
    for convolutions by default on Ampere and newer). ``tf32`` turns it on. Half precisions leave it off
    for the few float32 forwards they keep. On CUDA, cuDNN autotuning is on: an explanation runs a
    handful of fixed shapes hundreds of times. A caller's own settings come back when the call returns.
    A CUDA ``device`` other than the current one is made current for the call (Triton kernels and CUDA
    graphs go to the current device; see :func:`use_device`).
    """
    if device.type != "cuda":
        yield
        return
    switches = _tf32_switches()
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _, _ in switches]
    saved.append((torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark))
    with torch.cuda.device(device) if _off_current(device) else contextlib.nullcontext():
        try:
            for obj, attr, on, off in switches:
                setattr(obj, attr, on if precision == "tf32" else off)
            torch.backends.cudnn.benchmark = True
            yield
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)


class Scorer:
    """Scores inputs ``f_c(z)`` in chunks of ``batch_size``; float32 softmax; no host sync per chunk.

    ``precision`` ``bf16``/``fp16`` runs the forwards under autocast, with the conv/linear weights cast
    once per scorer rather than on every forward; the head and the softmax stay float32, and a call with
    ``fp32=True`` runs wholly in float32. The inputs go channels-last. When the model offers
    ``forward_normalized`` (and its ``mean``/``std``), the mask kernels normalise as they build the inputs
    and :attr:`normalize` says so. Backend flags (TF32, cuDNN autotuning) are the caller's business:
    wrap calls in :func:`backend_flags` (:func:`unioncam.explain_batch` does).

    Args:
        model: the classifier, on its device.
        batch_size: inputs per forward; ``None`` → :func:`default_batch_size` of the model's device.
        progress: anything with ``update(n)`` (a tqdm bar), told of every chunk scored.
        precision: one of :data:`PRECISIONS`, or ``"auto"`` (:func:`resolve_precision` on the model's device).
        fast: switches of the fast path (:mod:`unioncam.core.fast`: a ``FastPath`` or a dict of some of
            ``fixed_chunks``, ``pool_first``, ``compile``, ``cuda_graphs``) over the environment's
            ``UNIONCAM_*`` variables over the device's defaults; :attr:`fast` holds what is used.
    """

    def __init__(self, model: nn.Module, batch_size: int | None = None, progress: Any = None,
                 precision: str = "fp32", fast: FastPath | dict[str, bool] | None = None) -> None:
        self.model = model
        self.device = model_device(model)
        self.batch_size = validate_batch_size(batch_size) or default_batch_size(self.device)
        self.progress = progress
        self.precision = resolve_precision(precision, self.device)
        self.autocast_dtype = PRECISIONS[self.precision]
        _warn_if_emulated(self.device, self.autocast_dtype)
        fused = getattr(model, "forward_normalized", None)
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        self.normalize = (mean, std) if callable(fused) and isinstance(mean, torch.Tensor) and isinstance(
            std, torch.Tensor) else None
        # Masked inputs straight in the autocast dtype only when the model does no float math before its
        # first layer (the fused-normalisation case); otherwise in the model's own dtype.
        self.mask_dtype = (self.autocast_dtype if self.normalize is not None and self.autocast_dtype is not None
                           else model_dtype(model))
        # The last Linear (the head) stays float32 under autocast; found once, not per chunk.
        self._head = head_of(model)
        self._runners = {False: Runner(model, "forward"),
                         True: Runner(model, "forward_normalized") if self.normalize is not None else None}
        self.fast = resolve_fast(self.device, fast)

    @functools.cached_property
    def _low_params(self) -> dict[str, torch.Tensor]:
        """The convolutions' and linear layers' weights and biases (the head's excepted), in the autocast dtype.

        Made on the first half-precision forward, so a scorer that never runs one (the gradient
        methods, fp32) casts nothing.

        Autocast runs these layers in the low dtype and casts their float32 parameters on every call
        (it caches casts only of parameters that require grad): for VGG16 138 M values per chunk, about
        15 % of a bf16 forward on a CPU. Cast once here and handed to the forwards, they are the very
        tensors autocast would have made, so the scores are bit-identical.
        """
        return cast_params(self.model, self._head, self.autocast_dtype)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        """Autocast the forwards, except the model's last ``nn.Linear`` (its head), which runs in float32.

        Logits rounded to bf16 (8 significant bits) would move a softmax score by up to ~e^(|logit|/256):
        several percent for logits of 10–30. The head is a sliver of the cost, so it stays exact.
        """
        if self.autocast_dtype is None:
            yield
            return
        head = self._head
        device_type = self.device.type

        def fp32_head(mod: nn.Module, inputs: tuple, _out: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device_type, enabled=False):
                bias = None if mod.bias is None else mod.bias.float()
                return F.linear(inputs[0].float(), mod.weight.float(), bias)

        handle = head.register_forward_hook(fp32_head) if head is not None else None
        try:
            with torch.autocast(device_type=device_type, dtype=self.autocast_dtype):
                yield
        finally:
            if handle is not None:
                handle.remove()

    def __call__(self, n: int, build: Callable[[int, int], torch.Tensor], targets: torch.Tensor,
                 normalized: bool = False, fp32: bool = False,
                 fill: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Scores ``[n]`` (float32, on the device) of ``n`` inputs made by ``build(i, j)`` (inputs ``i:j``).

        ``targets``: ``[n]`` class indices on the device. ``normalized``: the inputs are already
        normalised (``forward_normalized``). ``fp32``: run these forwards in float32 whatever the
        precision (the few forwards that decide): they always take today's path. ``fill(i, j, out)``:
        optionally, build inputs ``i:j`` straight into ``out`` (``[j - i, 3, H, W]``, channels-last), which
        the fixed-chunk path uses to write each chunk into its reused (or CUDA graph's static) input.
        """
        runner = self._runners[normalized]
        assert runner is not None, "normalized inputs need a model with forward_normalized"
        if self.fast.fixed_chunks and not fp32 and n > 0:
            return self._fixed(n, build, targets, normalized, fill)
        params = {} if fp32 or self.autocast_dtype is None else self._low_params
        if self.fast.pool_first and not fp32:  # pool-first alone: today's chunks, the rewritten network
            eng = engine(self.model)
            runner = eng.runner(normalized, True, self.device)
            params = eng.low_params(self.autocast_dtype)
        out = torch.empty(n, device=targets.device, dtype=torch.float32)
        i, bs = 0, self.batch_size
        while i < n:
            j = min(n, i + bs)
            try:
                with torch.no_grad(), (contextlib.nullcontext() if fp32 else self._autocast()):
                    # Channels-last inputs for the channels-last convolutions explain_batch set up.
                    logits = torch.func.functional_call(
                        runner, params, (build(i, j).contiguous(memory_format=torch.channels_last),))
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or j - i == 1:
                    raise
                bs = max(1, (j - i) // 2)  # back off rather than fail; the result does not depend on chunking
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            out[i:j] = logits.float().softmax(-1).gather(1, targets[i:j, None]).squeeze(1)
            if self.progress is not None:
                self.progress.update(j - i)
            i = j
        return out

    def _fixed(self, n: int, build: Callable[[int, int], torch.Tensor], targets: torch.Tensor, normalized: bool,
               fill: Callable[[int, int, torch.Tensor], None] | None) -> torch.Tensor:
        """:meth:`__call__` with every chunk ``batch_size`` rows (the fast path's ``fixed_chunks``).

        The chunk buffer is made once per call (or is the CUDA graph's static input) and each chunk is
        built into it; the last chunk's rows past ``n`` keep what the buffer held (finite inputs: the
        previous chunk's, or zeros) and their scores are dropped. Rows are independent in eval mode, so
        no score depends on them.
        """
        eng = engine(self.model)
        dtype = self.autocast_dtype
        runner = eng.runner(normalized, self.fast.pool_first, self.device)
        fn = eng.chunk_fn(runner, dtype, self.precision)
        out = torch.empty(n, device=targets.device, dtype=torch.float32)
        buf: torch.Tensor | None = None
        i, bs = 0, self.batch_size
        while i < n:
            j = min(n, i + bs)
            m = j - i
            try:
                with torch.no_grad(), self._autocast():
                    if buf is None or buf.shape[0] != bs:
                        first = build(i, j)
                        # The precision's name, not only its dtype: fp32 and tf32 both have none, and a graph
                        # or compiled forward keeps the kernels (TF32 or not) it was made with.
                        key = (normalized, "pool-first" if eng.is_pool_first(runner) else "plain", self.precision,
                               dtype, (bs, *first.shape[1:]), first.dtype)
                        # A captured graph's static input is the buffer: chunks are built straight into it.
                        buf = eng.static_input(key)
                        if buf is None:
                            buf = torch.zeros((bs, *first.shape[1:]), device=first.device,
                                              dtype=first.dtype).contiguous(memory_format=torch.channels_last)
                        buf[:m].copy_(first)
                        logits = eng.forward(key, fn, buf, self.fast)
                    else:
                        def into(static: torch.Tensor, i: int = i, j: int = j) -> None:
                            if fill is not None:
                                fill(i, j, static[:j - i])
                            else:
                                static[:j - i].copy_(build(i, j))

                        logits = eng.forward(key, fn, buf, self.fast, fill=into)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or bs == 1:
                    raise
                bs = max(1, bs // 2)  # back off rather than fail: a new, smaller fixed shape
                buf = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            out[i:j] = logits[:m].float().softmax(-1).gather(1, targets[i:j, None]).squeeze(1)
            if self.progress is not None:
                self.progress.update(m)
            i = j
        return out

    def skip(self, n: int) -> None:
        """Tell the progress (when it counts against a total) that ``n`` planned forwards will not run."""
        skip = getattr(self.progress, "skip", None)
        if skip is not None and n > 0:
            skip(int(n))

    def masked(self, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
               fp32: bool = False) -> torch.Tensor:
        """``f_c(x ⊙ map)`` for maps ``[n, H, W]`` of images ``[n, 3, H, W]``."""
        return self(maps.shape[0], lambda i, j: images[i:j] * maps[i:j, None].to(images.dtype), targets,
                    fp32=fp32)

    def images(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``f_c(x)`` for images ``[n, 3, H, W]`` (moved to the device chunk by chunk)."""
        return self(images.shape[0], lambda i, j: images[i:j].to(self.device), targets.to(self.device))
