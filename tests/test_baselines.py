"""Each baseline on a case whose answer is known in closed form.

The tiny CNN ends in ReLU → global mean → linear head ``V``. At its ``relu`` layer the logit gradient is
``W_k,ij = V_ck / (h·w)`` everywhere, so every gradient weighting has a closed form.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

import unioncam

from .conftest import make_tiny_cnn


def _norm_up_relu(cam, size):
    u = F.interpolate(cam.clamp_min(0)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return (u - u.min()) / (u.max() - u.min())


@pytest.fixture
def case():
    model = make_tiny_cnn(seed=5)
    x = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(5))
    acts = {}

    def keep(_m, _i, out):
        acts["A"] = out.detach().clone()

    h = model.relu.register_forward_hook(keep)
    with torch.no_grad():
        c = int(model(x[None]).argmax())
    h.remove()
    A = acts["A"][0]  # [K, h, w], after ReLU
    Wk = model.head.weight[c].detach() / (A.shape[1] * A.shape[2])  # the constant gradient of each channel
    return model, x, c, A, Wk


def test_gradcam_weights_are_spatial_mean_gradients(case):
    model, x, c, A, Wk = case
    res = unioncam.explain(model, x, method="gradcam", layer="relu")
    assert res.target == c
    expected = _norm_up_relu((Wk[:, None, None] * A).sum(0), (20, 20))
    assert torch.allclose(res.saliency, expected, atol=1e-5)


def test_xgradcam_equals_gradcam_when_gradients_are_constant_per_channel(case):
    model, x, c, A, Wk = case
    res = unioncam.explain(model, x, method="xgradcam", layer="relu")
    expected = _norm_up_relu((Wk[:, None, None] * A).sum(0), (20, 20))
    assert torch.allclose(res.saliency, expected, atol=1e-5)


def test_layercam_keeps_positive_gradients_elementwise(case):
    model, x, c, A, Wk = case
    res = unioncam.explain(model, x, method="layercam", layer="relu")
    expected = _norm_up_relu((Wk.clamp_min(0)[:, None, None] * A).sum(0), (20, 20))
    assert torch.allclose(res.saliency, expected, atol=1e-5)
    # ...and differs from Grad-CAM, which lets negative weights subtract.
    gc = unioncam.explain(model, x, method="gradcam", layer="relu")
    assert (gc.saliency - res.saliency).abs().max() > 1e-3


def test_gradcampp_closed_form(case):
    model, x, c, A, Wk = case
    res = unioncam.explain(model, x, method="gradcam++", layer="relu")
    # α = W² / (2W² + ΣA·W³) = 1 / (2 + ΣA_k·W_k); weight_k = Σ_ij α·relu(W_k) = h·w·relu(W_k) / (2 + ΣA_k·W_k)
    S = A.sum((1, 2))
    hw = A.shape[1] * A.shape[2]
    weight = torch.where(Wk != 0, hw * Wk.clamp_min(0) / (2 + S * Wk), 0)
    expected = _norm_up_relu((weight[:, None, None] * A).sum(0), (20, 20))
    assert torch.allclose(res.saliency, expected, atol=1e-5)


def test_groupcam_follows_its_authors_algorithm():
    """Literal Group-CAM (numpy percentile, one forward per group) against the batched one."""
    model = make_tiny_cnn(seed=6, width=32, scale=0.05)  # 64 channels → 32 groups of 2; p ≈ 0.6, not 1
    x = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(6))
    res = unioncam.explain(model, x, method="groupcam", precision="fp32")
    acts = {}

    def keep(_m, _i, out):
        acts["A"] = out
        return out.clone()  # the in-place ReLU that follows must not overwrite the kept activations

    h = model.conv2.register_forward_hook(keep)
    logits = model(x[None])
    h.remove()
    c = int(logits.argmax())
    (grad,) = torch.autograd.grad(logits[0, c], acts["A"])
    A, G = acts["A"].detach()[0], grad[0]
    weighted = G.mean((1, 2))[:, None, None] * A
    blurred = gaussian_blur(x[None], [47, 47], [50.0, 50.0])  # kernel 51 shrunk to fit a 24-px image
    with torch.no_grad():
        base = model(blurred).softmax(-1)[0, c].item()
        total = torch.zeros(24, 24)
        for g in range(32):
            m = weighted[2 * g : 2 * g + 2].sum(0).clamp_min(0)
            thr = float(np.percentile(m.numpy(), 70))
            m = torch.where(m > thr, m, 0)
            u = F.interpolate(m[None, None], (24, 24), mode="bilinear", align_corners=False)[0, 0]
            if u.max() == u.min():
                continue
            u = (u - u.min()) / (u.max() - u.min())
            s = model(x[None] * u + blurred * (1 - u)).softmax(-1)[0, c].item() - base
            total += s * u
    total = total.clamp_min(0)
    expected = (total - total.min()) / (total.max() - total.min())
    assert res.details["groups"] == 32
    assert res.details["blur_score"] == pytest.approx(base, abs=1e-6)
    assert torch.allclose(res.saliency, expected, atol=1e-4)


@pytest.mark.parametrize("method", unioncam.METHODS)
def test_every_method_gives_a_unit_range_map_of_the_image_size(method):
    model = make_tiny_cnn(seed=8, scale=0.1)  # confident enough for β's, not saturated (blurred image p < 1)
    res = unioncam.explain(model, torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(8)), method=method)
    assert res.method == method and res.saliency.shape == (17, 23) and res.saliency.dtype == torch.float32
    assert res.saliency.min() >= 0 and res.saliency.max() <= 1
    assert res.saliency.max() == 1  # not degenerate on a random model and image
