"""The Method contract: a user's method is one registered class, and every entry point then takes its name."""

from __future__ import annotations

import pytest
import torch

import unioncam
from unioncam.methods import GradientMethod, Method, Options, Result, final, register, registry
from unioncam.validation import methods_arg, validate_method

from .models import make_tiny_cnn


@pytest.fixture
def registered():
    """Register the README's example (and a masked method) for one test, then remove them again."""
    added = []

    def add(cls):
        register(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        registry().pop(name)


def test_the_readme_example_is_a_method_everywhere(registered):
    @registered
    class MaxGradCAM(GradientMethod):
        """Channel weight = the largest gradient in the channel."""
        name = "maxgradcam"

        def weigh(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
            return (grads.amax((2, 3), keepdim=True) * acts).sum(1)

    model = make_tiny_cnn()
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = unioncam.explain(model, x, method="MaxGradCAM")
    assert res.method == "maxgradcam" and res.saliency.shape == (16, 16)
    assert res.details["masked_forwards"] == 0 and res.details["layer"] == "conv2"
    # the same map by hand: A and W of the layer, weighted, then norm(up(relu(·)))
    from unioncam.core import forward_pass
    from unioncam.validation import resolve_layer

    p = forward_pass(model, x[None], [None], resolve_layer(model, None), True)
    want = final((p.grads.amax((2, 3), keepdim=True) * p.acts).sum(1), (16, 16))[0]
    assert res.target == int(p.targets[0]) and torch.allclose(res.saliency, want, atol=1e-6)
    assert not torch.allclose(res.saliency, unioncam.explain(model, x, method="gradcam").saliency)
    assert validate_method("maxgradcam") == "maxgradcam" and "maxgradcam" in methods_arg("all")
    assert "maxgradcam" not in unioncam.METHODS  # the shipped list stays what ships


def test_a_masked_method_uses_the_scorer_and_reports_typed_details(registered):
    @registered
    class Occlude(Method):
        """Each channel's up-sampled map masks the image; its score change weighs it (Score-CAM minus the norm)."""
        name = "occlude"
        needs_gradients = False
        masked = True

        def run(self, p, scorer, options: Options) -> Result:
            B, K = p.acts.shape[:2]
            maps = final(p.acts.flatten(0, 1)[:, None], p.size)[:, 0]  # [B·K, H, W]
            scores = scorer.masked(p.x.repeat_interleave(K, 0), maps, p.targets.repeat_interleave(K))
            weights = scores.view(B, K) - p.scores[:, None]
            return Result(final((weights[..., None, None] * p.acts).sum(1), p.size),
                          {"masked_forwards": torch.full((B,), K)})

    model = make_tiny_cnn()
    xs = [torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = unioncam.explain_batch(model, xs, method="occlude", batch_size=5)
    assert [r.details["masked_forwards"] for r in out] == [32, 32]
    assert all(0 <= float(r.saliency.min()) and float(r.saliency.max()) <= 1 for r in out)


def test_names_are_unique():
    class Imposter(GradientMethod):
        name = "gradcam"

        def weigh(self, acts, grads):
            return acts.sum(1)

    with pytest.raises(ValueError, match="already registered"):
        register(Imposter)
    assert type(registry()["gradcam"]).__name__ == "GradCAM"


def test_shipped_methods_in_order():
    assert unioncam.METHODS == ("unioncam", "gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "groupcam")
    assert tuple(registry())[:7] == unioncam.METHODS
