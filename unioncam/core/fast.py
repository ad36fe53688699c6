"""The masked-forward fast path: switches over the scorer's one chunk loop, each with today's path as its twin.

An explanation is hundreds of forwards of one network over inputs of one size. Four switches make those
forwards cheaper without changing what they compute:

- ``fixed_chunks`` (``UNIONCAM_FIXED_CHUNKS``): every chunk of a scoring call has ``batch_size`` rows; the
  last one is padded (with the previous chunk's rows, or zeros) and its padded scores are dropped. One
  shape per explanation means cuDNN autotunes once, one compiled graph and one CUDA graph serve every
  chunk. Rows of a batch are independent in eval mode, so the scores do not depend on the padding.
- ``pool_first`` (``UNIONCAM_POOL_FIRST``): in the conv → ReLU → max-pool blocks of a torchvision VGG,
  pool before the bias and the ReLU: ``maxpool(relu(conv(x) + b)) == relu(maxpool(conv(x)) + b)``
  exactly, because ``t ↦ round(t + b)`` and ReLU are monotone, on a quarter of the elements. Where the
  convolution adds its bias inside the kernel with one rounding (oneDNN on a CPU, in bf16), moving the bias
  out would round twice, so there only the ReLU moves after the pool (``relu ∘ max == max ∘ relu``); cuDNN
  has torch add the bias in a separate pass, so on CUDA the bias moves too. Other models run unchanged.
- ``compile`` (``UNIONCAM_COMPILE``): the chunk forward through ``torch.compile(dynamic=False)``: Inductor
  keeps the library convolutions and fuses the pointwise tail (bias + ReLU) into one pass. Compiled once
  per model, shape and dtype and cached with the model; a compile that fails warns once and the forward
  runs eagerly from then on.
- ``cuda_graphs`` (``UNIONCAM_CUDA_GRAPHS``): CUDA only. The fixed-shape chunk forward is captured once
  per precision and shape (after two warm-up runs on a side stream, so cuDNN's autotuning is done) and
  replayed per chunk; the mask kernel writes each chunk straight into the graph's static input. A capture
  that fails, or whose graph replays nothing, releases its pool, restores the stream, warns once, and the
  forward runs without graphs from then on.

Each switch is ``0``/``1`` in the environment (read when a :class:`~unioncam.core.Scorer` is made) or
given to the scorer (``fast=``); given beats the environment, which beats :func:`defaults`. Compile and
graphs need one shape, so they turn ``fixed_chunks`` on. The forwards that decide (UnionCAM's β's,
``fp32=True``) always take today's path. ``docs/fast-path.md`` says what was measured.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ENV", "FastPath", "Engine", "Runner", "cast_params", "defaults", "engine", "head_of", "pool_first_plan",
           "release", "resolve_fast", "stats"]

#: The environment variable of each switch (``0`` off, ``1`` on; unset: :func:`defaults`).
ENV = {"fixed_chunks": "UNIONCAM_FIXED_CHUNKS", "pool_first": "UNIONCAM_POOL_FIRST",
       "compile": "UNIONCAM_COMPILE", "cuda_graphs": "UNIONCAM_CUDA_GRAPHS"}


@dataclass(frozen=True)
class FastPath:
    """Which switches of the fast path are on (see the module's docstring)."""

    fixed_chunks: bool = False
    pool_first: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    @property
    def active(self) -> bool:
        return any(asdict(self).values())

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


def defaults(device: torch.device) -> FastPath:
    """The switches when neither the caller nor the environment sets them: all off, on CPU and CUDA.

    CPU (``docs/fast-path.md``, a 2-core AMD EPYC shared with other jobs, VGG16 224², bf16, chunks of 8,
    variants taking turns): compiled 1628 ms per chunk against eager 1642 ms, pool-first 1712 ms, all
    within each other's p10–p90; the compile itself took 25 s (cold cache) per model and chunk shape, a
    fifth of a whole 224² explanation there and five 64² ones. Without compile, fixed chunks only add
    padded rows. No switch is on where it was not measured to pay. CUDA: none has run on a GPU yet; the
    A/B step of the GPU pass (``benchmarks/gpu_ab.py``) measures each against today's path, and that
    measurement decides the CUDA defaults.
    """
    return FastPath()


def _env(name: str) -> bool | None:
    v = os.environ.get(name, "").strip().lower()
    if v in ("", "auto"):
        return None
    return v not in ("0", "false", "off", "no")


def resolve_fast(device: torch.device, given: FastPath | dict[str, bool] | None = None) -> FastPath:
    """The switches a scorer on ``device`` uses: ``given`` (a :class:`FastPath`, or a dict of some switches)
    over the environment (:data:`ENV`) over :func:`defaults`. Compile and graphs turn ``fixed_chunks`` on;
    graphs are dropped off CUDA (there is nothing to capture)."""
    chosen = defaults(device).as_dict()
    for name, var in ENV.items():
        v = _env(var)
        if v is not None:
            chosen[name] = v
    if given is not None:
        items = given.as_dict() if isinstance(given, FastPath) else dict(given)
        unknown = set(items) - set(chosen)
        if unknown:
            raise ValueError(f"fast: unknown switch(es) {sorted(unknown)}; known: {sorted(chosen)}")
        chosen.update({k: bool(v) for k, v in items.items() if v is not None})
    if device.type != "cuda":
        chosen["cuda_graphs"] = False
    if chosen["compile"] or chosen["cuda_graphs"]:
        chosen["fixed_chunks"] = True
    return FastPath(**chosen)


# ------------------------------------------------------------------------------------- the weights


def head_of(model: nn.Module) -> nn.Module | None:
    """The model's last ``nn.Linear`` (its head, which stays float32 under autocast)."""
    return next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)


def cast_params(model: nn.Module, head: nn.Module | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The convolutions' and linear layers' parameters (the head's excepted) in ``dtype``, named as
    ``torch.func.functional_call`` of a runner holding the model as ``model`` wants them.

    Autocast would cast these on every forward (it caches casts only of parameters that require grad);
    cast once, they are the very tensors autocast would make, so the scores are bit-identical.
    """
    out = {}
    for mname, mod in model.named_modules():
        if mod is head or not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        for pname, param in mod.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                out[f"model.{mname}.{pname}" if mname else f"model.{pname}"] = param.detach().to(dtype)
    return out


# -------------------------------------------------------------------------------------- pool first


def _vgg_forward(model: nn.Module) -> bool:
    """Whether ``model``'s forward is torchvision VGG's (``features → avgpool → flatten → classifier``),
    after at most the pixel normalisation of :class:`~unioncam.models.PixelVGG16` / ``pixel_model``."""
    from torchvision.models.vgg import VGG

    if not isinstance(model, VGG) or not isinstance(getattr(model, "features", None), nn.Sequential):
        return False
    for cls in type(model).__mro__:
        if cls is VGG:
            return True
        if not ({"forward", "forward_normalized"} & set(vars(cls))):
            continue
        pixel = getattr(cls, "_unioncam_pixel", False) or (
            cls.__module__ == "unioncam.models.vgg" and cls.__name__ == "PixelVGG16")
        if not pixel:
            return False  # a subclass with its own forward: its network is not ours to rewrite
    return False


def pool_first_plan(model: nn.Module) -> tuple | None:
    """``model.features`` as steps: ``(conv, pool)`` for each conv → ReLU → max-pool block, the module
    itself otherwise; ``None`` when the model is not a torchvision VGG or has no such block."""
    if not _vgg_forward(model):
        return None
    mods = list(model.features)
    plan: list[Any] = []
    i = 0
    while i < len(mods):
        a, b, c = (mods[i:i + 3] + [None, None])[:3]
        if (isinstance(a, nn.Conv2d) and a.bias is not None and a.padding_mode == "zeros"
                and isinstance(b, nn.ReLU) and isinstance(c, nn.MaxPool2d)):
            plan.append((a, c))
            i += 3
        else:
            plan.append(a)
            i += 1
    return tuple(plan) if any(isinstance(s, tuple) for s in plan) else None


class Runner(nn.Module):
    """Calls ``model.<method>``: a module to hand ``torch.func.functional_call`` (parameters ``model.*``)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


class _PoolFirstRunner(nn.Module):
    """Torchvision VGG's forward with its conv → ReLU → max-pool blocks pooled first.

    Holds the model as ``model`` (the parameter names ``functional_call`` swaps, and the head the scorer
    hooks, are the model's own); the plan is a plain tuple, not submodules, so nothing is registered twice.
    ``bias_after``: add the bias after the pool (where the convolution adds it in a separate pass, as
    with cuDNN); else keep it in the convolution and move only the ReLU.
    """

    def __init__(self, model: nn.Module, plan: tuple, normalized: bool, bias_after: bool) -> None:
        super().__init__()
        self.model = model
        self._plan = plan
        self.normalized = normalized
        self.bias_after = bias_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if not self.normalized and callable(getattr(m, "normalize", None)):
            x = m.normalize(x)
        for step in self._plan:
            if not isinstance(step, tuple):
                x = step(x)
                continue
            conv, pool = step
            if self.bias_after:
                y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                x = torch.relu(pool(y) + conv.bias.to(y.dtype)[None, :, None, None])
            else:
                x = torch.relu(pool(conv(x)))
        x = m.avgpool(x)
        return m.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------------------------- the engine

#: Names a ``torch.compile`` backend other than Inductor (the GPU pass's dry run uses ``eager``).
COMPILE_BACKEND = "UNIONCAM_COMPILE_BACKEND"

#: CUDA graphs kept per model (one per image size, precision and input kind); the oldest goes first.
MAX_GRAPHS = 4

#: Causes of the one warning each: a failed compile, a failed capture (the process then runs without).
_WARNED: dict[str, str] = {}


def _warn_once(what: str, exc: BaseException, then: str) -> None:
    if what in _WARNED:
        return
    reason = f"{type(exc).__name__}: {exc}"
    reason = reason if len(reason) <= 600 else reason[:600] + " ..."
    _WARNED[what] = reason
    warnings.warn(f"unioncam: {what} failed ({reason}); {then}. Set {ENV[what]}=0 to skip it and silence this "
                  "warning.", RuntimeWarning, stacklevel=4)


class _TorchCuda:
    """The CUDA calls a capture makes, in one place: ``torch.cuda``'s, and the caching allocator's two
    private-pool calls a failed capture needs. Tests put a fake here to run the capture's failure paths
    (a capture that raises, a graph that replays nothing) on a CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def end_pool(device: int, pool: Any) -> None:
        """Stop routing the capture's allocations to ``pool`` (``capture_end`` does this, unless it raised first)."""
        C = torch._C
        end = getattr(C, "_cuda_endAllocateToPool", None) or getattr(C, "_cuda_endAllocateCurrentStreamToPool")
        end(device, pool)

    @staticmethod
    def release_pool(device: int, pool: Any) -> None:
        """Let the allocator free ``pool``'s memory once nothing uses it (a graph's destructor does this, but
        only for a graph that was captured)."""
        torch._C._cuda_releasePool(device, pool)


_cuda: Any = _TorchCuda()


class _Graph:
    """One captured CUDA graph of ``fn`` over a static input (see :meth:`Engine.forward`).

    Made on the static input's device (whatever the current one is), after two warm-up runs on a side
    stream (cuDNN autotuning, lazy initialisation and any compilation happen there, not in the graph).
    ``torch.cuda.graph`` is not used: its exit ends the capture without ``try``/``finally``, so a CUDA error
    during capture leaves the caching allocator routing to the graph's pool ("captures underway") and the
    side stream current, and every later ``empty_cache`` fails. Here a failed capture ends the pool, releases
    it and restores the stream before it raises, so the caller runs on without graphs.

    A graph that replays nothing (no nodes: captured on another device's stream, where torch only warns)
    is a failed capture too: after capture the output is set to NaN, a fresh input replayed, and the
    result must equal an eager call on that input. ``pool_bytes``: the reserved memory the capture added
    (the graph's private pool, which ``max_memory_allocated`` does not see between replays).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], static_in: torch.Tensor) -> None:
        cuda = _cuda
        self.static_in = static_in
        dev = static_in.device
        with cuda.device(dev):
            prev = cuda.current_stream(dev)
            side = cuda.Stream(dev)
            side.wait_stream(prev)
            with cuda.stream(side):
                for _ in range(2):
                    fn(static_in)
            prev.wait_stream(side)
            cuda.synchronize(dev)
            reserved = cuda.memory_reserved(dev)
            pool = cuda.graph_pool_handle()
            graph = cuda.CUDAGraph()
            try:
                with cuda.stream(side):
                    graph.capture_begin(pool=pool)
                    try:
                        out = fn(static_in)
                    except BaseException:
                        try:  # end the capture; the forward's own error is the one to report
                            graph.capture_end()
                        except Exception:  # noqa: BLE001
                            pass
                        raise
                    graph.capture_end()
            except BaseException:
                _abandon(cuda, graph, dev, pool, side, prev)
                raise
            self.pool_bytes = max(0, cuda.memory_reserved(dev) - reserved)
            self.graph, self.static_out = graph, out
            self._check(fn)

    def _check(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Raise unless a replay computes ``fn`` of the static input (an empty graph replays nothing)."""
        with torch.no_grad():
            self.static_in.uniform_()  # a fresh input: the scorer writes each chunk over it anyway
            self.static_out.fill_(float("nan"))
            self.graph.replay()
            got = self.static_out.float()
            want = fn(self.static_in).float()
            scale = float(want.abs().max()) if want.numel() else 0.0
            if not torch.allclose(got, want, rtol=1e-2, atol=1e-3 + 1e-2 * scale, equal_nan=True):
                finite = bool(torch.isfinite(got).all())
                raise RuntimeError(
                    "the captured CUDA graph does not compute the forward: "
                    + ("its replay left the output untouched (an empty graph: captured on another device's "
                       "stream?)" if not finite else
                       f"its replay differs from an eager call by {float((got - want).abs().max()):.3g}"))

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.static_out


def _abandon(cuda: Any, graph: Any, dev: torch.device, pool: Any, side: Any, prev: Any) -> None:
    """After a failed capture: end the stream's capture if it is still under way, stop routing allocations
    to the graph's pool and release it, make the stream current before the capture current again. Each
    step is tried on its own (the first failure must not hide behind a second)."""
    index = dev.index if dev.index is not None else 0
    try:
        with cuda.stream(side):
            if cuda.is_current_stream_capturing():
                graph.capture_end()
    except Exception:  # noqa: BLE001 - the capture failed already; this only ends what is left of it
        pass
    try:
        cuda.end_pool(index, pool)
    except Exception:  # noqa: BLE001 - capture_end got as far as ending the pool itself
        pass
    else:
        try:  # released only if this process still held it (a second release would abort in C++)
            cuda.release_pool(index, pool)
        except Exception:  # noqa: BLE001
            pass
    try:
        cuda.set_stream(prev)
    except Exception:  # noqa: BLE001
        pass


class Engine:
    """Per model: the half-precision weights, the compiled forwards, the CUDA graphs and their timings.

    Cached with the model (:func:`engine`) and rebuilt when its weights change, so a server's start-up
    (:func:`unioncam.prepare`) pays compile and capture, and every request after it replays.
    """

    #: What builds a graph; tests put a fake here to check the static-input plumbing without a GPU.
    graph_factory: Callable[[Callable, torch.Tensor], Any] = _Graph
    #: Devices whose chunks are captured (tests add ``cpu`` to run the plumbing with a fake graph).
    graph_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self.state: tuple | None = None
        self.head = head_of(model)
        self.low: dict[torch.dtype, dict[str, torch.Tensor]] = {}
        self.runners: dict[tuple, nn.Module] = {}
        self.fns: dict[tuple, Callable] = {}
        self.compiled: dict[tuple, Callable] = {}
        self.graphs: dict[tuple, Any] = {}
        self.compile_s: dict[str, float] = {}
        self.capture_s: dict[str, float] = {}
        self.pool_bytes: dict[str, int] = {}
        self.compile_failed = False
        self.graphs_failed = False

    @functools.cached_property
    def plan(self) -> tuple | None:
        """:func:`pool_first_plan` of the model (its structure, not its weights: made once)."""
        return pool_first_plan(self._model())

    def refresh(self, state: tuple) -> None:
        """Drop everything made from older weights (a ``load_state_dict`` bumps the state)."""
        if state != self.state:
            self.state = state
            self.low.clear()
            self.graphs.clear()
            self.compiled.clear()
            self.runners.clear()
            self.fns.clear()
            self.compile_s.clear()
            self.capture_s.clear()
            self.pool_bytes.clear()

    def low_params(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        if dtype is None:
            return {}
        if dtype not in self.low:
            self.low[dtype] = cast_params(self._model(), self.head, dtype)
        return self.low[dtype]

    def runner(self, normalized: bool, pool_first: bool, device: torch.device) -> nn.Module:
        """The module the chunk forward calls, one per kind (kept, so its compiled form is reused): the
        model's ``forward`` (``forward_normalized`` for normalised inputs), or its pool-first VGG."""
        key = (normalized, pool_first and self.plan is not None, device.type)
        if key not in self.runners:
            model = self._model()
            self.runners[key] = (_PoolFirstRunner(model, self.plan, normalized,
                                                  bias_after=device.type == "cuda") if key[1]
                                 else Runner(model, "forward_normalized" if normalized else "forward"))
        return self.runners[key]

    @staticmethod
    def is_pool_first(runner: nn.Module) -> bool:
        """Whether ``runner`` is the pool-first network (part of every compile / graph key)."""
        return isinstance(runner, _PoolFirstRunner)

    def chunk_fn(self, runner: nn.Module, dtype: torch.dtype | None,
                 precision: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ logits`` of ``runner`` with the cached ``dtype`` weights: one function object per runner,
        dtype and precision name, so that its compiled form is made once per precision (fp32 and tf32 share
        a dtype but not their kernels). The caller enters autocast and the head's float32 hook (the scorer's
        ``_autocast``) around it, as today's path does."""
        key = (id(runner), dtype, precision)
        if key not in self.fns:
            params = self.low_params(dtype)

            def fn(x: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(runner, params, (x,))

            self.fns[key] = fn
        return self.fns[key]

    def forward(self, key: tuple, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                fast: FastPath, fill: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Logits of the chunk ``x`` (already in its fixed shape) through ``fn``, compiled and/or replayed.

        ``key`` names the forward (runner, precision name, dtype, shape): one compiled graph, one CUDA graph
        per key (a graph replays the kernels chosen at capture: strict fp32 and TF32 need one each).
        With graphs, ``fill(static_input)`` writes the chunk into the graph's static input (the mask
        kernel writing straight into it); without ``fill`` the chunk ``x`` is copied in.
        """
        if fast.compile and not self.compile_failed:
            fn = self._compiled(key, fn, x)
        if fast.cuda_graphs and not self.graphs_failed and x.device.type in self.graph_devices:
            g = self.graphs.get(key)
            if g is None:
                if fast.compile and not self.compile_failed and self._name(key) not in self.compile_s:
                    fn(x)  # compile first, timed on its own: capture_s is then the capture alone
                g = self._capture(key, fn, x)
            if g is not None:
                if fill is not None:
                    fill(g.static_in)
                elif x.data_ptr() != g.static_in.data_ptr():
                    g.static_in.copy_(x)
                return g()
        if fill is not None:
            fill(x)
        return fn(x)

    def static_input(self, key: tuple) -> torch.Tensor | None:
        """The static input of ``key``'s graph, if one is captured (the scorer builds chunks into it)."""
        g = self.graphs.get(key)
        return None if g is None else g.static_in

    @staticmethod
    def _name(key: tuple) -> str:
        return "/".join(map(str, key))

    def _compiled(self, key: tuple, fn: Callable, x: torch.Tensor) -> Callable:
        ck = id(fn)  # one torch.compile wrapper per chunk function; dynamo keeps one graph per shape
        name = self._name(key)
        if ck not in self.compiled:
            # UNIONCAM_COMPILE_BACKEND: another torch.compile backend; "eager" traces with dynamo but
            # compiles nothing (seconds, not minutes, on a CPU), so the GPU pass's dry run covers this path.
            backend = os.environ.get(COMPILE_BACKEND, "").strip() or "inductor"
            self.compiled[ck] = torch.compile(fn, dynamic=False, backend=backend)
        compiled = self.compiled[ck]
        if name in self.compile_s:
            return compiled

        def first(z: torch.Tensor) -> torch.Tensor:
            if self.compile_failed:
                return fn(z)
            if name in self.compile_s:
                # Compiled already: a graph's warm-up and capture call this wrapper again, and a capture
                # must not synchronise.
                return compiled(z)
            t0 = time.perf_counter()
            try:
                out = compiled(z)
            except Exception as e:  # noqa: BLE001 - Inductor raises many types; eager is always right
                self.compile_failed = True
                _warn_once("compile", e, "the masked forwards run eagerly for the rest of this process")
                return fn(z)
            if z.is_cuda:
                torch.cuda.synchronize(z.device)
            self.compile_s[name] = time.perf_counter() - t0
            return out

        return first

    def _capture(self, key: tuple, fn: Callable, x: torch.Tensor) -> Any:
        """Capture ``key``'s graph: ``capture_s`` times the warm-up runs, the capture and its check (a
        compile happened before, timed apart); ``pool_bytes`` is the graph's private pool."""
        name = self._name(key)
        t0 = time.perf_counter()
        try:
            static_in = torch.zeros_like(x, memory_format=torch.channels_last)
            static_in.copy_(x)
            g = type(self).graph_factory(fn, static_in)
        except Exception as e:  # noqa: BLE001 - any capture failure: run without graphs
            self.graphs_failed = True
            _warn_once("cuda_graphs", e, "the masked forwards run without CUDA graphs for the rest of this process")
            if x.is_cuda:
                try:  # the graph released its pool and restored the stream; a sticky error shows here
                    torch.cuda.synchronize(x.device)
                except Exception:  # noqa: BLE001 - the eager forward that follows raises it properly
                    pass
            return None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.capture_s[name] = time.perf_counter() - t0
        self.pool_bytes[name] = int(getattr(g, "pool_bytes", 0) or 0)
        while len(self.graphs) >= MAX_GRAPHS:  # each graph holds its activations' memory: keep the newest
            old = next(iter(self.graphs))
            self.graphs.pop(old)
            self.pool_bytes.pop(self._name(old), None)
        self.graphs[key] = g
        return g

    def stats(self) -> dict[str, Any]:
        return {"compile_s": dict(self.compile_s), "capture_s": dict(self.capture_s),
                "graph_pool_bytes": dict(self.pool_bytes), "graph_pool_gb": sum(self.pool_bytes.values()) / 2**30,
                "compile_failed": self.compile_failed, "graphs_failed": self.graphs_failed,
                "graphs": len(self.graphs)}


class _Slot:
    """Holds a model's engine in the model's own ``__dict__``.

    The engine's runners hold the model, so a cache outside the model (a weak-keyed dict) would keep it
    alive for ever; inside it, model and engine form a cycle the garbage collector frees together. The
    slot pickles and copies empty (``torch.save(model)``, ``copy.deepcopy``): compiled functions and
    graphs belong to this process only.
    """

    __slots__ = ("engine",)

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine

    def __reduce__(self) -> tuple:
        return (_Slot, ())


_ATTR = "_unioncam_fast_engine"


def _state_key(model: nn.Module) -> tuple:
    # In-place updates (load_state_dict, optimiser steps) bump a tensor's version: the cache notices them.
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def engine(model: nn.Module) -> Engine:
    """The model's :class:`Engine`, made on first use and refreshed when its weights changed."""
    slot = model.__dict__.get(_ATTR)
    if not isinstance(slot, _Slot) or slot.engine is None:
        slot = _Slot(Engine(model))
        model.__dict__[_ATTR] = slot  # not a submodule, parameter or buffer: state_dict and .to() ignore it
    slot.engine.refresh(_state_key(model))
    return slot.engine


def release(model: nn.Module) -> None:
    """Drop the model's engine: its half-precision weights, compiled forwards and CUDA graphs."""
    model.__dict__.pop(_ATTR, None)


def stats(model: nn.Module) -> dict[str, Any]:
    """Compile and capture seconds (per forward key, timed apart), the CUDA graphs' private pools (bytes per
    key, and ``graph_pool_gb`` for the graphs kept) and failures of the model's fast path so far."""
    slot = model.__dict__.get(_ATTR)
    return {} if not isinstance(slot, _Slot) or slot.engine is None else slot.engine.stats()
