"""The batched engine against the literal reference, on fresh random inputs.

Tolerance (fp32): final map max abs difference ≤ 1e-4, and the same ``selected`` wherever
``|β_union − β_reg|`` exceeds ``BETA_ROUNDING``. The two paths sum channels in another order and batch
their forwards differently, so maps differ by float rounding (~1e-7) and the scores of masked inputs by up
to ~2e-5 on a confident VGG16 (a threshold entry that flips moves the denoised map a little); β's are compared to ``BETA_ROUNDING`` and, where β_union and β_reg are
closer than that, the choice between two near-equal maps is a coin toss and is not compared.
"""

import pytest
import torch

import unioncam
from unioncam.reference import unioncam_reference

from .conftest import make_tiny_cnn

MAP_TOL = 1e-4
BETA_ROUNDING = 1e-4


def _check(fast, ref):
    assert fast.target == ref.target
    assert fast.score == pytest.approx(ref.score, abs=BETA_ROUNDING)
    for key in ("beta_denoise", "beta_region", "beta_union", "baseline_score"):
        assert fast.details[key] == pytest.approx(ref.details[key], abs=BETA_ROUNDING), key
    assert fast.details["denoised_fraction"] == pytest.approx(ref.details["denoised_fraction"], abs=1e-6)
    for key in ("active_channels", "theta", "layer", "masked_forwards"):
        assert fast.details[key] == ref.details[key], key
    margin = abs(ref.details["beta_union"] - ref.details["beta_region"])
    if margin > BETA_ROUNDING:
        assert fast.details["selected"] == ref.details["selected"]
    if fast.details["selected"] == ref.details["selected"]:
        assert (fast.saliency - ref.saliency).abs().max().item() <= MAP_TOL
    return margin


@pytest.mark.parametrize("seed", range(6))
def test_tiny_cnn_pre_relu_layer_matches_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    model = make_tiny_cnn(seed=seed, width=8 + 4 * (seed % 3))
    H, W = [(16, 16), (13, 21), (24, 9)][seed % 3]  # odd and non-square sizes too
    x = torch.rand(3, H, W, generator=g)
    theta = [10.0, 0.0, 100.0, 37.5, 10.0, 90.0][seed]
    target = None if seed % 2 == 0 else int(torch.randint(10, (1,), generator=g))
    fast = unioncam.explain(model, x, target=target, theta=theta, batch_size=[64, 7, 1, 5, 64, 3][seed],
                            precision="fp32")
    ref = unioncam_reference(model, x, target=target, theta=theta)
    _check(fast, ref)


def test_batch_of_images_matches_reference_image_by_image():
    """Several images' masks share chunks; each result still equals its own literal run."""
    model = make_tiny_cnn(seed=7)
    g = torch.Generator().manual_seed(7)
    xs = [torch.rand(3, 16, 16, generator=g) for _ in range(3)] + [torch.rand(3, 10, 14, generator=g)]
    targets = [None, 3, None, 9]
    fast = unioncam.explain_batch(model, xs, targets=targets, batch_size=10, precision="fp32")
    margins = [_check(f, unioncam_reference(model, x, target=t)) for x, t, f in zip(xs, targets, fast)]
    assert max(margins) > BETA_ROUNDING  # the selection was really compared somewhere


@pytest.mark.slow
def test_vgg16_64px_matches_reference(vgg_random):
    """VGG16 (random weights) at 64×64, ``features.29``: ~490 masked forwards each way.

    Random VGG16's softmax is nearly flat and both β's come out negative, which makes the union map all
    zeros. Its head is scaled by 256 for this test (exactly undone after), so the scores and β's carry
    signal: this image gives β's of about 0.14–0.17, so the selection and both maps are really compared.
    """
    x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(12))
    head = vgg_random.classifier[6]
    with torch.no_grad():
        head.weight.mul_(256)
    try:
        fast = unioncam.explain(vgg_random, x, precision="fp32")
        ref = unioncam_reference(vgg_random, x)
        region = unioncam.explain(vgg_random, x, method="scorecam", precision="fp32").saliency
    finally:
        with torch.no_grad():
            head.weight.div_(256)
    assert _check(fast, ref) > BETA_ROUNDING
    assert min(ref.details["beta_region"], ref.details["beta_denoise"]) > 0.01
    assert ref.saliency.max() == 1
    if ref.details["selected"] == "region":  # the region map is Score-CAM's map
        assert (region - ref.saliency).abs().max().item() <= MAP_TOL
