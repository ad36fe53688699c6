"""The masked-forward fast path (``unioncam.core.fast``): each switch against today's path, on fresh random inputs.

Fixed chunks and pool-first must give today's scores bit for bit; compiled forwards must agree within the
dtype's rounding; CUDA graphs cannot run here, so their plumbing (the chunk built straight into the static
input, one capture, a replay per chunk, the fall-back) is checked with a fake graph.
"""

from __future__ import annotations

import contextlib
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import unioncam
from unioncam.core import FastPath, Scorer, resolve_fast
from unioncam.core import fast as fastmod
from unioncam.core.fast import ENV, Engine, pool_first_plan
from unioncam.kernels import masked_inputs_torch
from unioncam.kernels.masks import masked_inputs_triton

from .models import make_tiny_cnn, make_tiny_vgg

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fastmod, "_WARNED", {})  # each test sees its own first warning


def _inputs(n: int, size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------------------------------ switches


def test_switches_resolve_given_over_environment_over_defaults(monkeypatch):
    assert resolve_fast(CPU) == FastPath() and not FastPath().active  # all off by default
    assert resolve_fast(torch.device("cuda")) == FastPath()
    monkeypatch.setenv("UNIONCAM_POOL_FIRST", "1")
    monkeypatch.setenv("UNIONCAM_COMPILE", "0")
    assert resolve_fast(CPU) == FastPath(pool_first=True)
    assert resolve_fast(CPU, {"pool_first": False}) == FastPath()
    # Compile and graphs need one chunk shape; graphs exist on CUDA only.
    assert resolve_fast(CPU, {"compile": True}) == FastPath(fixed_chunks=True, pool_first=True, compile=True)
    assert resolve_fast(CPU, {"cuda_graphs": True, "pool_first": False}) == FastPath()
    assert resolve_fast(torch.device("cuda"), {"cuda_graphs": True}).fixed_chunks
    with pytest.raises(ValueError, match="unknown switch"):
        resolve_fast(CPU, {"graphs": True})
    monkeypatch.setenv("UNIONCAM_CUDA_GRAPHS", "1")
    assert Scorer(make_tiny_cnn()).fast == FastPath(pool_first=True)  # skipped cleanly on a CPU


# ----------------------------------------------------------------------------------- fixed chunks


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fixed_chunks_scores_do_not_depend_on_the_padding(precision):
    model = make_tiny_cnn(seed=3).to(memory_format=torch.channels_last)
    x, t = _inputs(13, 16, 10, seed=1)
    fixed = Scorer(model, batch_size=4, precision=precision, fast={"fixed_chunks": True})
    sizes = []
    handle = model.conv1.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].shape[0]))
    try:
        got = fixed.images(x, t)
    finally:
        handle.remove()
    assert sizes == [4, 4, 4, 4]  # one shape: the last chunk of 1 is padded to 4
    # Exact: today's path over the same 16 rows, the 3 padding rows anything at all (here: noise).
    pad = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    today = Scorer(model, batch_size=4, precision=precision).images(torch.cat([x, pad]),
                                                                    torch.cat([t, t[:3]]))
    assert torch.equal(got, today[:13])
    # Against today's unpadded last chunk (a forward of 1 row): oneDNN may split a convolution's
    # reductions by batch size, so only rounding-level differences are allowed there.
    unpadded = Scorer(model, batch_size=4, precision=precision).images(x, t)
    assert torch.allclose(got, unpadded, rtol=0, atol=1e-6 if precision == "fp32" else 1e-3)


# ------------------------------------------------------------------------------------- pool first


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("pixel", [True, False])
def test_pool_first_scores_are_bit_identical(precision, pixel, monkeypatch):
    model = make_tiny_vgg(seed=1, pixel=pixel).to(memory_format=torch.channels_last)
    x, t = _inputs(6, 32, 10, seed=2)
    plain = Scorer(model, batch_size=3, precision=precision).images(x, t)
    calls = []
    forward = fastmod._PoolFirstRunner.forward
    monkeypatch.setattr(fastmod._PoolFirstRunner, "forward", lambda self, z: calls.append(1) or forward(self, z))
    pooled = Scorer(model, batch_size=3, precision=precision, fast={"pool_first": True})
    assert torch.equal(pooled.images(x, t), plain)
    assert len(calls) == 2  # the rewritten network ran, once per chunk
    if pixel:  # the region map's normalised inputs (forward_normalized) too
        z = (x - model.mean) / model.std
        n = z.shape[0]
        a = Scorer(model, batch_size=3, precision=precision)(n, lambda i, j: z[i:j], t, normalized=True)
        b = pooled(n, lambda i, j: z[i:j], t, normalized=True)
        assert torch.equal(a, b)


def _separate_bias_forward(model, x):
    """The tiny VGG as cuDNN runs it: each convolution without its bias, the bias added in a pass of its own."""
    for m in model.features:
        if isinstance(m, torch.nn.Conv2d):
            y = F.conv2d(x, m.weight, None, m.stride, m.padding)
            x = y + m.bias.to(y.dtype)[None, :, None, None]
        else:
            x = m(x)
    return model.classifier(torch.flatten(model.avgpool(x), 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_after_the_pool_is_exact_where_the_convolution_adds_its_bias_apart(dtype):
    # The CUDA form of pool-first moves the bias too; cuDNN convolutions cannot run here, so it is held
    # against a plain forward that adds every bias in a pass of its own, as torch does with cuDNN. Every
    # convolution of this model starts a conv → ReLU → pool block (so every bias is moved).
    model = make_tiny_vgg(seed=4, pixel=False, cfg=(8, "M", 16, "M", 16, "M")).to(memory_format=torch.channels_last)
    runner = fastmod._PoolFirstRunner(model, pool_first_plan(model), normalized=True, bias_after=True)
    x, _ = _inputs(4, 32, 10, seed=5)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert torch.equal(runner(x), _separate_bias_forward(model, x))


def test_pool_first_leaves_other_models_alone():
    assert pool_first_plan(make_tiny_cnn()) is None
    assert pool_first_plan(make_tiny_vgg(batch_norm=True)) is None  # BN between conv and ReLU: not monotone
    model = make_tiny_cnn()
    assert Engine(model).runner(False, True, CPU).method == "forward"  # today's runner


def test_explanations_with_fixed_chunks_and_pool_first_are_todays():
    model = make_tiny_vgg(seed=2)
    img = _inputs(1, 32, 10, seed=6)[0][0]
    for precision in ("fp32", "bf16"):
        a = unioncam.explain(model, img, precision=precision, batch_size=4)
        b = unioncam.explain(model, img, precision=precision, batch_size=4,
                             fast={"fixed_chunks": True, "pool_first": True})
        # Fixed chunks change how many masked inputs one forward takes, so the GEMMs block differently: a
        # CPU's bf16 kernels may then round a score's last bit otherwise (seen: 1.8e-7 on an Intel Xeon).
        # The answer is the same map and the same selection, to within that rounding.
        atol = 0.0 if precision == "fp32" else 1e-5
        torch.testing.assert_close(b.saliency, a.saliency, rtol=0.0, atol=atol)
        assert a.details["selected"] == b.details["selected"]
        assert b.details["fast_path"] == ["fixed_chunks", "pool_first"] and "fast_path" not in a.details


def test_the_engine_lives_and_dies_with_its_model():
    import copy
    import gc
    import io
    import weakref

    model = make_tiny_vgg(seed=7)
    x, t = _inputs(3, 32, 10, seed=3)
    Scorer(model, batch_size=2, precision="bf16", fast={"fixed_chunks": True, "pool_first": True}).images(x, t)
    assert fastmod.stats(model)["graphs"] == 0
    buf = io.BytesIO()
    torch.save(model, buf)  # the engine (functions, cached weights) is not saved with the model
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert fastmod.stats(loaded) == {} and fastmod.stats(copy.deepcopy(model)) == {}
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # no cache outside the model keeps it alive


# ---------------------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_scores_equal_eager_within_the_dtypes_rounding():
    # One small model, two compiles (fp32; bf16 with pool-first), each with a prepare() first, as a
    # server's start-up would: the explanation after it meets no new compile.
    model = make_tiny_vgg(seed=5)
    x, t = _inputs(5, 32, 10, seed=7)
    fp32 = Scorer(model, batch_size=4, precision="fp32").images(x, t)
    for precision, extra in (("fp32", {}), ("bf16", {"pool_first": True})):
        switches = {"compile": True, **extra}
        info = unioncam.prepare(model, 32, precision=precision, batch_size=4, fast=switches)
        assert info["fast"]["fixed_chunks"] and info["compile_s"], info
        eager = Scorer(model, batch_size=4, precision=precision, fast={"fixed_chunks": True, **extra}).images(x, t)
        compiled = Scorer(model, batch_size=4, precision=precision, fast=switches).images(x, t)
        if precision == "fp32":
            assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-7)
        else:  # no further from eager bf16 than eager bf16 is from fp32 (Inductor rounds fused steps once)
            assert (compiled - eager).abs().max() <= 2 * (eager - fp32).abs().max() + 1e-4
        before = fastmod.stats(model)["compile_s"]
        unioncam.explain(model, x[0], precision=precision, batch_size=4, fast=switches)
        assert not fastmod.stats(model)["compile_failed"]
        # Nothing compiled on the first request: no new key, no key timed again (the engine was kept).
        assert fastmod.stats(model)["compile_s"] == before


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = make_tiny_cnn(seed=2)
    x, t = _inputs(7, 16, 10, seed=8)
    eager = Scorer(model, batch_size=4, fast={"fixed_chunks": True}).images(x, t)
    with pytest.warns(RuntimeWarning, match="compile failed .*no C\\+\\+ compiler") as rec:
        got = Scorer(model, batch_size=4, fast={"compile": True}).images(x, t)
    assert len([w for w in rec if "compile failed" in str(w.message)]) == 1
    assert torch.equal(got, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, eager from now on
        assert torch.equal(Scorer(model, batch_size=4, fast={"compile": True}).images(x, t), eager)


# ----------------------------------------------------------------------------------- CUDA graphs


class _FakeGraph:
    """Stands in for a captured CUDA graph: replay runs the function on the static input."""

    made: list["_FakeGraph"] = []

    def __init__(self, fn, static_in):
        self.fn, self.static_in, self.replays = fn, static_in, 0
        self.static_out = fn(static_in)
        _FakeGraph.made.append(self)

    def __call__(self):
        self.replays += 1
        self.static_out = self.fn(self.static_in)
        return self.static_out


def _graphs_on_cpu(monkeypatch, factory) -> None:
    monkeypatch.setattr(Engine, "graph_factory", factory)
    monkeypatch.setattr(Engine, "graph_devices", ("cpu", "cuda"))


def test_graph_plumbing_builds_each_chunk_into_the_static_input(monkeypatch):
    _graphs_on_cpu(monkeypatch, _FakeGraph)
    _FakeGraph.made = []
    model = make_tiny_vgg(seed=3)
    x, t = _inputs(10, 32, 10, seed=9)
    z = ((x - model.mean) / model.std).contiguous(memory_format=torch.channels_last)
    today = Scorer(model, batch_size=4, precision="bf16")(10, lambda i, j: z[i:j], t, normalized=True)
    scorer = Scorer(model, batch_size=4, precision="bf16")
    scorer.fast = FastPath(fixed_chunks=True, pool_first=True, cuda_graphs=True)  # as on CUDA
    written = []

    def fill(i, j, out):
        written.append((i, j, out.data_ptr(), out.shape[0]))
        out.copy_(z[i:j])

    got = scorer(10, lambda i, j: z[i:j], t, normalized=True, fill=fill)
    assert torch.equal(got, today)
    (g,) = _FakeGraph.made  # one capture for the explanation's one chunk shape
    assert g.static_in.shape == (4, 3, 32, 32) and g.static_in.is_contiguous(memory_format=torch.channels_last)
    assert g.replays == 3  # every chunk replays, the first one included (captured on it)
    assert written == [(4, 8, g.static_in.data_ptr(), 4), (8, 10, g.static_in.data_ptr(), 2)]
    # A second call of the same shape reuses the graph.
    scorer(10, lambda i, j: z[i:j], t, normalized=True, fill=fill)
    assert len(_FakeGraph.made) == 1 and g.replays == 6


def test_plain_and_pool_first_forwards_get_graphs_of_their_own(monkeypatch):
    _graphs_on_cpu(monkeypatch, _FakeGraph)
    _FakeGraph.made = []
    model = make_tiny_vgg(seed=8)
    x, t = _inputs(5, 32, 10, seed=12)
    want = Scorer(model, batch_size=4).images(x, t)
    for pool_first in (False, True, False):
        scorer = Scorer(model, batch_size=4)
        scorer.fast = FastPath(fixed_chunks=True, pool_first=pool_first, cuda_graphs=True)
        assert torch.allclose(scorer.images(x, t), want, rtol=0, atol=1e-6)
    assert len(_FakeGraph.made) == 2  # one per network, the plain one reused


def _falls_back_once() -> tuple[Scorer, torch.Tensor, torch.Tensor]:
    """Scores with CUDA graphs whose capture fails: today's scores, and one warning saying so."""
    model = make_tiny_cnn(seed=4)
    x, t = _inputs(9, 16, 10, seed=10)
    today = Scorer(model, batch_size=4).images(x, t)
    scorer = Scorer(model, batch_size=4)
    scorer.fast = FastPath(fixed_chunks=True, cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="cuda_graphs failed") as rec:
        got = scorer.images(x, t)
    assert len([w for w in rec if "cuda_graphs failed" in str(w.message)]) == 1
    assert torch.allclose(got, today, rtol=0, atol=1e-6)
    return scorer, x, t


def test_a_failed_capture_falls_back_with_one_warning(monkeypatch):
    def broken(fn, static_in):
        raise RuntimeError("operation not permitted when stream is capturing")

    _graphs_on_cpu(monkeypatch, broken)
    scorer, x, t = _falls_back_once()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.images(x, t)


class _FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass


class _FakeCUDAGraph:
    """``torch.cuda.CUDAGraph`` on a CPU: what the capture's forward registers (``record``) is replayed."""

    def __init__(self, cuda):
        self.cuda, self.work = cuda, []

    def capture_begin(self, pool=None):
        self.pool = pool
        self.cuda.underway.append(pool)  # the allocator routes the capture's allocations to the pool
        self.cuda.capturing = self
        self.cuda.reserved += self.cuda.pool_grows

    def capture_end(self):
        self.cuda.capturing = None  # cudaStreamEndCapture ends the capture even when it fails
        if self.cuda.end_fails:  # torch raises before it stops routing to the pool
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.cuda.underway.remove(self.pool)

    def record(self, work):
        self.work.append(work)

    def replay(self):
        self.cuda.replays += 1
        if not self.cuda.empty:
            for w in self.work:
                w()


class _FakeCuda:
    """What ``fast._Graph`` calls of torch.cuda and the caching allocator, on a CPU, with the allocator's
    bookkeeping: pools under way (``empty_cache`` trips on any left) and releases."""

    def __init__(self, end_fails=False, empty=False, pool_grows=0):
        self.end_fails, self.empty, self.pool_grows = end_fails, empty, pool_grows
        self.default = _FakeStream("default")
        self.current, self.capturing = self.default, None
        self.underway, self.ended, self.released = [], [], []
        self.reserved, self.replays, self.pools = 0, 0, 0

    def device(self, dev):
        return contextlib.nullcontext()

    def current_stream(self, dev=None):
        return self.current

    def set_stream(self, s):
        self.current = s

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def Stream(self, dev):  # noqa: N802 - torch's name
        return _FakeStream("side")

    def synchronize(self, dev=None):
        pass

    def memory_reserved(self, dev=None):
        return self.reserved

    def graph_pool_handle(self):
        self.pools += 1
        return (0, self.pools)

    def CUDAGraph(self):  # noqa: N802 - torch's name
        return _FakeCUDAGraph(self)

    def is_current_stream_capturing(self):
        return self.capturing is not None

    def end_pool(self, device, pool):
        if pool not in self.underway:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        self.underway.remove(pool)
        self.ended.append(pool)

    def release_pool(self, device, pool):
        self.released.append(pool)


def _recording(cuda, fn):
    """``fn`` whose work a fake capture records (a real capture records the kernels it launches)."""

    def run(x):
        y = fn(x)
        if cuda.capturing is not None:
            cuda.capturing.record(lambda: y.copy_(fn(x)))
        return y

    return run


def test_a_capture_records_its_pool_and_replays_the_forward(monkeypatch):
    cuda = _FakeCuda(pool_grows=3 << 20)
    monkeypatch.setattr(fastmod, "_cuda", cuda)
    fn = _recording(cuda, lambda x: x.flatten(1).sum(1, keepdim=True) * 2)
    static = torch.zeros(4, 3, 2, 2)
    g = fastmod._Graph(fn, static)
    assert g.pool_bytes == 3 << 20 and cuda.underway == [] and cuda.current is cuda.default
    static.copy_(torch.arange(48.0).reshape(4, 3, 2, 2))
    assert torch.equal(g(), fn(static))  # a replay computes the forward of what the static input holds now


def test_a_graph_that_replays_nothing_fails_its_capture():
    cuda = _FakeCuda(empty=True)  # captured on another device's stream: no nodes, torch only warns
    fn = _recording(cuda, lambda x: x.flatten(1).sum(1, keepdim=True) * 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastmod, "_cuda", cuda)
        with pytest.raises(RuntimeError, match="left the output untouched"):
            fastmod._Graph(fn, torch.zeros(4, 3, 2, 2))
    assert cuda.replays == 1


@pytest.mark.parametrize("cuda", [_FakeCuda(end_fails=True), _FakeCuda(empty=True)], ids=["capture-raises", "empty"])
def test_a_failed_capture_leaves_no_pool_and_the_stream_it_found(monkeypatch, cuda):
    # torch.cuda.graph would leave the pool "under way" (every later empty_cache trips) and its stream current.
    monkeypatch.setattr(fastmod, "_cuda", cuda)
    _graphs_on_cpu(monkeypatch, fastmod._Graph)
    scorer, _, _ = _falls_back_once()
    assert cuda.underway == [] and cuda.current is cuda.default and cuda.capturing is None
    if cuda.end_fails:  # the pool capture_end left routed: ended and released once, here
        assert cuda.ended == [(0, 1)] and cuda.released == [(0, 1)]
    else:  # captured, then found empty: torch ended the pool; its graph's destructor releases it
        assert cuda.ended == [] and cuda.released == []
    assert fastmod.stats(scorer.model)["graphs_failed"] is True and fastmod.stats(scorer.model)["graphs"] == 0


def test_compile_and_capture_are_timed_apart(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fastmod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow_compile(fn, **kw):
        done = []

        def run(x):
            if not done:
                clock[0] += 10.0  # the compile, on the first call
                done.append(1)
            return fn(x)
        return run

    class TimedGraph(_FakeGraph):
        def __init__(self, fn, static_in):
            clock[0] += 1.0  # the capture
            super().__init__(fn, static_in)

    monkeypatch.setattr(torch, "compile", slow_compile)
    _graphs_on_cpu(monkeypatch, TimedGraph)
    model = make_tiny_cnn(seed=5)
    x, t = _inputs(4, 16, 10, seed=11)
    scorer = Scorer(model, batch_size=4)
    scorer.fast = FastPath(fixed_chunks=True, compile=True, cuda_graphs=True)
    scorer.images(x, t)
    st = fastmod.stats(model)
    (name,) = st["capture_s"]
    assert st["compile_s"] == {name: 10.0} and st["capture_s"] == {name: 1.0}


def test_strict_fp32_and_tf32_get_graphs_and_compiled_forwards_of_their_own(monkeypatch):
    # Both run float32 tensors (no autocast dtype); a graph replays the kernels chosen at its capture.
    _graphs_on_cpu(monkeypatch, _FakeGraph)
    _FakeGraph.made = []
    model = make_tiny_cnn(seed=6)
    x, t = _inputs(4, 16, 10, seed=12)
    for precision in ("fp32", "tf32", "fp32"):
        scorer = Scorer(model, batch_size=4, precision=precision)
        scorer.fast = FastPath(fixed_chunks=True, cuda_graphs=True)
        scorer.images(x, t)
    assert len(_FakeGraph.made) == 2
    keys = sorted(fastmod.stats(model)["capture_s"])
    assert len(keys) == 2 and any("/fp32/" in k for k in keys) and any("/tf32/" in k for k in keys)
    eng = fastmod.engine(model)
    runner = eng.runner(False, False, CPU)
    assert eng.chunk_fn(runner, None, "fp32") is not eng.chunk_fn(runner, None, "tf32")


def test_graph_pools_show_in_the_stats(monkeypatch):
    class PoolGraph(_FakeGraph):
        pool_bytes = 5 << 20

    _graphs_on_cpu(monkeypatch, PoolGraph)
    model = make_tiny_cnn(seed=7)
    x, t = _inputs(4, 16, 10, seed=13)
    scorer = Scorer(model, batch_size=4)
    scorer.fast = FastPath(fixed_chunks=True, cuda_graphs=True)
    scorer.images(x, t)
    st = fastmod.stats(model)
    assert list(st["graph_pool_bytes"].values()) == [5 << 20] and st["graph_pool_gb"] == (5 << 20) / 2**30


# ------------------------------------------------------------------------------ the current CUDA device


def test_a_model_on_another_gpu_is_made_the_current_device(monkeypatch):
    from unioncam.core import backend_flags, use_device

    set_to, entered = [], []

    class Device:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    monkeypatch.setattr(torch.cuda, "device", Device)
    for dev in ("cuda:1", "cuda:0", "cpu"):
        use_device(dev)
    assert set_to == [torch.device("cuda:1")]  # a worker on GPU 1: its Triton kernels and graphs go there
    for dev in ("cuda:1", "cuda:0", "cpu"):
        with backend_flags(torch.device(dev), "bf16"):
            pass
    assert entered == [torch.device("cuda:1"), "exit"]  # explain on a model of a non-current GPU


# ------------------------------------------------------------------------------ the mask kernel's out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_inputs_write_into_a_given_tensor(dtype):
    g = torch.Generator().manual_seed(11)
    images, acts = torch.rand(2, 3, 16, 16, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    b, k = torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2])
    lo, hi = torch.full((3,), -2.0), torch.full((3,), 2.0)
    want = masked_inputs_torch(images, acts, b, k, lo, hi, out_dtype=dtype)
    for fn in (masked_inputs_torch, masked_inputs_triton):
        buf = torch.zeros(4, 3, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
        res = fn(images, acts, b, k, lo, hi, out_dtype=dtype, out=buf[1:4])
        assert res.data_ptr() == buf[1:4].data_ptr()
        assert torch.allclose(buf[1:4].float(), want.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
        assert torch.equal(buf[0], torch.zeros_like(buf[0]))  # nothing outside it


def test_prepare_warms_the_chunk_shape_of_an_explanation():
    model = make_tiny_vgg(seed=6)
    info = unioncam.prepare(model, 32, precision="fp32", batch_size=4, fast={"pool_first": True,
                                                                                "fixed_chunks": True})
    assert info["batch_size"] == 4 and info["precision"] == "fp32" and info["fast"]["pool_first"]
    assert info["seconds"] >= 0 and info["compile_s"] == {} and info["capture_s"] == {}


def test_a_forward_that_fails_during_capture_is_the_error_reported(monkeypatch):
    cuda = _FakeCuda(end_fails=True)  # the capture's end fails too, as it does after a CUDA error

    def fn(x):
        if cuda.capturing is not None:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED in the forward")
        return x.sum()

    monkeypatch.setattr(fastmod, "_cuda", cuda)
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_NOT_SUPPORTED"):
        fastmod._Graph(fn, torch.zeros(2, 3))
    assert cuda.underway == [] and cuda.released == [(0, 1)] and cuda.current is cuda.default
