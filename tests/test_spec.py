"""One test per step of the spec, on examples small enough to check by hand."""

import pytest
import torch

import unioncam
from unioncam.core import black_probs
from unioncam.methods import select, union
from unioncam.kernels import denoise_torch, minmax_norm, up, upsampled_range_torch

from .conftest import make_tiny_cnn


def _one(w, a=None):
    """A single image, single channel [1, 1, h, w] gradient (and activations, default ones)."""
    w = torch.tensor(w, dtype=torch.float32)[None, None]
    a = torch.ones_like(w) if a is None else torch.tensor(a, dtype=torch.float32)[None, None]
    return w, a


# ---------------------------------------------------------------------------------------- norm / up


def test_norm_maps_to_unit_range_and_constant_to_zero():
    m = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]])
    out = minmax_norm(m)
    assert torch.equal(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))


def test_up_is_bilinear_without_corner_alignment():
    # [0, 1] → 4 samples at source coordinates −0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    row = up(torch.tensor([[0.0, 1.0]]), (1, 4))
    assert torch.allclose(row, torch.tensor([[0.0, 0.25, 0.75, 1.0]]))


# --------------------------------------------------------------------------------- AMD, eqs. 1–3


def test_percentile_threshold_linear_interpolation():
    # θ = 50 of [1, 2, 3, 4]: position 1.5 → p = 2.5, so 1 and 2 are removed; S = 3 + 4 = 7.
    w, a = _one([[1.0, 2.0], [3.0, 4.0]])
    cam, removed, removed_pos = denoise_torch(w, a, 50.0)
    assert torch.allclose(cam[0], torch.tensor([[0.0, 0.0], [3 / 7, 4 / 7]]))
    assert removed.item() == 0.5 and removed_pos.item() == 0.5


def test_percentile_ties_keep_every_value_equal_to_the_threshold():
    # θ = 50 of [1, 1, 1, 2]: position 1.5 between two 1's → p = 1; "≥ p" keeps all four.
    w, a = _one([[1.0, 1.0], [1.0, 2.0]])
    cam, removed, _ = denoise_torch(w, a, 50.0)
    assert removed.item() == 0.0
    assert torch.allclose(cam[0], torch.tensor([[0.2, 0.2], [0.2, 0.4]]))


@pytest.mark.parametrize("theta, kept", [(0.0, 4), (100.0, 1)])
def test_percentile_extremes(theta, kept):
    # θ = 0 → p = min (all kept); θ = 100 → p = max (only the maximum kept).
    w, a = _one([[-1.0, 0.5], [2.0, 3.0]])
    cam, removed, _ = denoise_torch(w, a, theta)
    assert removed.item() == (4 - kept) / 4
    if theta == 100.0:
        assert torch.allclose(cam[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    else:  # negatives survive the threshold but relu drops them: α = 1/5.5 on the positives
        assert torch.allclose(cam[0], torch.tensor([[0.0, 0.5], [2.0, 3.0]]) / 5.5)


def test_pixel_averaged_weighting_is_a_hadamard_product_summed_over_channels():
    # Two channels, θ = 0 (nothing removed). α_k = 1/S_k on positive gradients, times relu(W) ⊙ A.
    w = torch.tensor([[[[1.0, 3.0]], [[2.0, -2.0]]]])  # [1, 2, 1, 2]
    a = torch.tensor([[[[10.0, 20.0]], [[5.0, 7.0]]]])
    cam, _, _ = denoise_torch(w, a, 0.0)
    expected = torch.tensor([[1 / 4 * 1 * 10 + 1 / 2 * 2 * 5, 1 / 4 * 3 * 20 + 0.0]])
    assert torch.allclose(cam[0], expected)


def test_zero_sum_channel_contributes_nothing():
    # No positive gradient → S_k = 0 → α_k = 0 everywhere (no division by zero, no NaN).
    w, a = _one([[-1.0, -2.0], [0.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]])
    cam, _, _ = denoise_torch(w, a, 10.0)
    assert torch.equal(cam, torch.zeros_like(cam))


def test_denoised_fraction_reported():
    # This layer's gradient is V_ck/(h·w) where conv2 > 0 and 0 elsewhere (ReLU, then mean-pool): many
    # ties, so θ = 50 removes far fewer than half the entries. The literal loop counts them one by one.
    from unioncam.reference import unioncam_reference

    m = make_tiny_cnn()
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    res = unioncam.explain(m, x, theta=50.0)
    ref = unioncam_reference(m, x, theta=50.0)
    assert 0 < res.details["denoised_fraction"] < 0.5
    assert res.details["denoised_fraction"] == pytest.approx(ref.details["denoised_fraction"], abs=1e-9)
    assert 0.0 <= res.details["denoised_positive_fraction"] <= 1.0


# --------------------------------------------------------------------------------- region map


def test_constant_channels_are_pruned_exactly():
    m = make_tiny_cnn()
    with torch.no_grad():  # channel 0 of the layer becomes the constant 0.7, channel 1 the constant 0
        m.conv2.weight[:2] = 0
        m.conv2.bias[0], m.conv2.bias[1] = 0.7, 0.0
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = unioncam.explain(m, x, method="scorecam")
    assert res.details["active_channels"] == 30
    assert res.details["masked_forwards"] == 30
    # up() of a constant map may wobble by an ulp; the range op reports it, the pruning must ignore it.
    acts = torch.full((1, 1, 8, 8), 0.7)
    lo, hi = upsampled_range_torch(acts, (16, 16))
    assert (hi - lo).item() <= 2e-7


def test_region_map_is_the_score_weighted_sum_of_upsampled_activations():
    m = make_tiny_cnn(seed=1)
    x = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))
    res = unioncam.explain(m, x, method="scorecam")
    # Literal Score-CAM, written out here: one forward per non-constant channel.
    acts = {}

    def keep(_mod, _inp, out):  # returns None: the forward goes on with its own output
        acts["A"] = out.detach().clone()

    h = m.conv2.register_forward_hook(keep)
    with torch.no_grad():
        c = m(x[None]).argmax(1).item()
    h.remove()
    A = acts["A"][0]
    total = torch.zeros(12, 12)
    for k in range(A.shape[0]):
        U = torch.nn.functional.interpolate(A[k][None, None], (12, 12), mode="bilinear", align_corners=False)[0, 0]
        if A[k].max() == A[k].min():
            continue
        M = (U - U.min()) / (U.max() - U.min())
        with torch.no_grad():
            s = m((x * M)[None]).softmax(-1)[0, c]
        total += s * U
    total = total.clamp_min(0)
    expected = (total - total.min()) / (total.max() - total.min())
    assert torch.allclose(res.saliency, expected, atol=1e-5)


# ------------------------------------------------------------------------------- β's, AMU, AMS


def test_black_score_is_the_model_on_zeros_and_is_cached():
    m = make_tiny_cnn()
    b = black_probs(m, (16, 16), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert torch.allclose(b, m(torch.zeros(1, 3, 16, 16)).softmax(-1)[0])
    assert black_probs(m, (16, 16), torch.device("cpu"), torch.float32) is b  # cached
    with torch.no_grad():  # in-place weight change: the cache must notice
        m.head.bias.add_(1.0)
        m.head.bias[0] += 5.0
    b2 = black_probs(m, (16, 16), torch.device("cpu"), torch.float32)
    assert b2 is not b and not torch.allclose(b2, b)


@pytest.mark.parametrize("seed,expected", [(2, "region"), (3, "union")])  # one image for each AMS branch
def test_betas_are_masked_scores_minus_the_black_score(seed, expected):
    m = make_tiny_cnn(seed=seed)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))
    res = unioncam.explain(m, x)
    region = unioncam.explain(m, x, method="scorecam").saliency  # Score-CAM map = Lh_reg
    c, d = res.target, res.details
    with torch.no_grad():
        b = m(torch.zeros(1, 3, 16, 16)).softmax(-1)[0, c].item()
        f_reg = m((x * region)[None]).softmax(-1)[0, c].item()
    assert d["baseline_score"] == pytest.approx(b, abs=1e-7)
    assert d["beta_region"] == pytest.approx(f_reg - b, abs=1e-6)
    assert d["selected"] == expected
    if expected == "region":
        assert torch.allclose(res.saliency, region, atol=1e-6)
    else:
        assert d["beta_union"] > d["beta_region"]
        with torch.no_grad():
            f_u = m((x * res.saliency)[None]).softmax(-1)[0, c].item()
        assert d["beta_union"] == pytest.approx(f_u - b, abs=1e-6)


def test_union_weights_maps_by_beta_then_normalises():
    lh_den = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    lh_reg = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]])
    out = union(lh_den, lh_reg, torch.tensor([0.2]), torch.tensor([0.6]))
    # 0.2·den + 0.6·reg = [[0.2, 0.6], [0.4, 0]] → /0.6
    assert torch.allclose(out[0], torch.tensor([[1 / 3, 1.0], [2 / 3, 0.0]]))
    # A negative β subtracts its map; relu clips what goes below zero before normalising.
    neg = union(lh_den, lh_reg, torch.tensor([-0.6]), torch.tensor([0.6]))
    assert torch.allclose(neg[0], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_select_is_strict():
    lh_union = torch.ones(3, 2, 2)
    lh_reg = torch.zeros(3, 2, 2)
    beta_union = torch.tensor([0.5, 0.5, 0.4])
    beta_reg = torch.tensor([0.4, 0.5, 0.5])  # greater, equal (→ region), smaller
    sal, chosen = select(lh_union, lh_reg, beta_union, beta_reg)
    assert chosen.tolist() == [True, False, False]
    assert sal[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_result_reports_what_the_spec_lists():
    m = make_tiny_cnn()
    res = unioncam.explain(m, torch.rand(3, 16, 16))
    for key in ("beta_denoise", "beta_region", "beta_union", "baseline_score", "selected", "active_channels",
                "denoised_fraction", "theta", "layer"):
        assert key in res.details, key
    assert res.saliency.dtype == torch.float32 and res.saliency.shape == (16, 16)
    assert res.saliency.min() >= 0 and res.saliency.max() <= 1
    assert res.details["selected"] in ("union", "region") and res.details["layer"] == "conv2"
    assert res.details["masked_forwards"] == res.details["active_channels"] + 3
