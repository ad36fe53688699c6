"""The gradient-weighted baselines: one forward and one backward, no masked forwards."""

from __future__ import annotations

import torch

from .base import GradientMethod, register

__all__ = ["GradCAM", "GradCAMPlusPlus", "LayerCAM", "XGradCAM"]


@register
class GradCAM(GradientMethod):
    """Grad-CAM (Selvaraju et al. 2017): channel weight = spatial mean of the gradient."""

    name = "gradcam"
    rank = 1

    def weigh(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return (grads.mean((2, 3), keepdim=True) * acts).sum(1)


@register
class GradCAMPlusPlus(GradientMethod):
    """Grad-CAM++ (Chattopadhyay et al. 2018) with the score ``Y = exp(logit)``.

    Its derivatives are ``exp(logit)·W^n``, so in ``α = ∂²Y / (2∂²Y + Σ A ∂³Y)`` the exponential cancels,
    and it scales every channel weight by the same positive factor, which ``norm`` removes: neither is
    materialised (``exp`` of a large logit would overflow).
    """

    name = "gradcam++"
    rank = 1

    def weigh(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2, g3 = grads.pow(2), grads.pow(3)
        denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1), 0)
        weights = (alpha * grads.clamp_min(0)).sum((2, 3), keepdim=True)
        return (weights * acts).sum(1)


@register
class XGradCAM(GradientMethod):
    """XGrad-CAM (Fu et al. 2020): channel weight = Σ_ij (A_ij / Σ A) W_ij (0 where the activations sum to 0)."""

    name = "xgradcam"
    rank = 1

    def weigh(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        s = acts.sum((2, 3), keepdim=True)
        weights = torch.where(s != 0, (grads * acts).sum((2, 3), keepdim=True) / torch.where(s != 0, s, 1), 0)
        return (weights * acts).sum(1)


@register
class LayerCAM(GradientMethod):
    """LayerCAM (Jiang et al. 2021): element-wise ``relu(W) ⊙ A`` summed over channels."""

    name = "layercam"
    rank = 1

    def weigh(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return (grads.clamp_min(0) * acts).sum(1)
