"""Fast scoring: ``precision="bf16"|"fp16"`` runs the region map's masked forwards under autocast.

The softmax, the model's head and the three β forwards that decide the union and the AMS selection stay
float32. Half precision changes the region map's scores by rounding, so it is held to agreement with
float32, not equality. The tiny CNN has a sharp softmax (scores near 0 and 1), the hard case. What is
tested there: the same AMS selection on every image, Pearson correlation of the final maps ≥ 0.999 on
at least 15 of 16 images and ≥ 0.99 on all. Measured figures over more images and models
(``benchmarks/bench_precision.py``) are in the README.
"""

import pytest
import torch
import torch.nn.functional as F

import unioncam
from unioncam.core import Scorer

from .conftest import make_tiny_cnn
from .test_kernels import NormalizedTiny


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.equal(a, b):
        return 1.0  # also for two all-zero maps, where the correlation is undefined
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def _images(n: int, size: tuple[int, int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=g) for _ in range(n)]


def test_bad_precision_is_named():
    model = make_tiny_cnn()
    x = torch.rand(3, 16, 16)
    for bad in ("fp8", "float32", None, 16):
        with pytest.raises(unioncam.InvalidInputError) as err:
            unioncam.explain(model, x, precision=bad)
        assert err.value.field == "precision" and "bf16" in str(err.value) and "auto" in str(err.value)


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32"), (None, "fp32")])
def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch, native, expected):
    from unioncam.core import scorer

    monkeypatch.setattr(scorer, "cpu_has_native", lambda dtype: native if dtype == torch.bfloat16 else False)
    assert scorer.resolve_precision("auto", "cpu") == expected
    assert scorer.resolve_precision("AUTO", torch.device("cpu")) == expected
    for name in ("fp32", "tf32", "bf16", "fp16"):  # a named precision is never changed
        assert scorer.resolve_precision(name, "cpu") == name
    assert scorer.resolve_precision("auto", "meta") == "fp32"  # neither CUDA nor a CPU: strict fp32
    model = make_tiny_cnn(seed=3)
    x = torch.rand(3, 16, 16)
    seen = []
    handle = model.conv2.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        default = unioncam.explain(model, x, method="scorecam")  # "auto" is the default
    finally:
        handle.remove()
    assert default.details["precision"] == expected
    # The masked forwards (after the float32 gradient pass) ran in bf16 exactly when "auto" chose it.
    assert (torch.bfloat16 in seen[1:]) == (expected == "bf16") and set(seen) <= {torch.float32, torch.bfloat16}
    same = unioncam.explain(model, x, method="scorecam", precision=expected)
    assert torch.equal(default.saliency, same.saliency)
    assert unioncam.explain(model, x, method="gradcam", precision="fp32").details["precision"] == "fp32"


def test_auto_precision_on_cuda_is_bf16_where_the_gpu_has_it(monkeypatch):
    from unioncam.core import scorer

    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert scorer.resolve_precision("auto", "cuda:0") == expected


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_masked_forwards_run_in_the_asked_precision(precision, dtype):
    model = make_tiny_cnn(seed=2)
    seen = []
    handle = model.conv2.register_forward_hook(lambda _m, _i, out: seen.append((out.dtype, out.shape[0])))
    try:
        res = unioncam.explain(model, torch.rand(3, 16, 16), precision=precision)
    finally:
        handle.remove()
    # The gradient pass and the black-image score stay float32; the region map's masked forwards run in
    # `dtype`; the three β forwards that decide the union and the selection (a pair, then one) in float32.
    assert seen[:2] == [(torch.float32, 1), (torch.float32, 1)]
    assert seen[-2:] == [(torch.float32, 2), (torch.float32, 1)], seen
    assert {d for d, _ in seen[2:-2]} == {dtype}, seen
    assert sum(n for _, n in seen[2:]) == res.details["masked_forwards"]


@pytest.mark.parametrize("precision,normalized", [("bf16", False), ("bf16", True), ("fp16", False)])
def test_half_precision_agrees_with_fp32_on_tiny_cnn(precision, normalized):
    model = NormalizedTiny(seed=5) if normalized else make_tiny_cnn(seed=5)
    images = _images(16, (32, 32), seed=1)
    full = unioncam.explain_batch(model, images)
    half = unioncam.explain_batch(model, images, precision=precision)
    corr = sorted(pearson(a.saliency, b.saliency) for a, b in zip(full, half))
    agree = [a.details["selected"] == b.details["selected"] for a, b in zip(full, half)]
    margin = [abs(a.details["beta_union"] - a.details["beta_region"]) for a in full]
    assert corr[1] >= 0.999 and corr[0] >= 0.99, corr
    assert all(agree), list(zip(agree, margin))
    for a, b in zip(full, half):
        # The explained class and its score come from the float32 gradient pass: identical.
        assert (a.target, a.score, a.details["baseline_score"]) == (b.target, b.score, b.details["baseline_score"])


def test_bf16_scorecam_agrees_with_fp32_on_vgg16(vgg_random):
    # Score-CAM rather than UnionCAM: on random weights at 32×32 both β's of UnionCAM are negative, the
    # union map is all zeros for either precision, and a correlation of zero maps means nothing.
    x = _images(1, (32, 32), seed=2)[0]
    full = unioncam.explain(vgg_random, x, method="scorecam")
    half = unioncam.explain(vgg_random, x, method="scorecam", precision="bf16")
    assert full.details["active_channels"] == half.details["active_channels"]
    assert pearson(full.saliency, half.saliency) >= 0.999


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("normalized", [False, True])
def test_weights_cast_once_score_exactly_as_plain_autocast(precision, dtype, normalized):
    # The scorer hands the forwards conv/linear weights cast once; the twin is plain autocast casting them
    # on every call, with the head in float32. Same tensors, so the scores must be bit-identical.
    model = NormalizedTiny(seed=7) if normalized else make_tiny_cnn(seed=7)
    net = model.net if normalized else model
    scorer = Scorer(model, batch_size=5, precision=precision)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(13, 3, 24, 20, generator=g)
    targets = torch.randint(0, 10, (13,), generator=g)
    scorer(2, lambda i, j: x[i:j], targets, normalized=normalized, fp32=True)
    assert "_low_params" not in vars(scorer)  # float32 forwards cast nothing
    got = scorer(13, lambda i, j: x[i:j], targets, normalized=normalized)
    assert set(scorer._low_params) == {f"model.{'net.' if normalized else ''}{n}"
                                       for n in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")}

    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        h = net.pool(torch.relu(net.conv1(x)))
        h = net.relu(net.conv2(h)).mean((2, 3))
    logits = F.linear(h.float(), net.head.weight, net.head.bias)
    want = logits.softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert torch.equal(got, want)
    # The model's own parameters are untouched.
    assert all(p.dtype == torch.float32 for p in model.parameters())
