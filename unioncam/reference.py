"""The literal UnionCAM: the spec written out plainly, one masked forward per channel.

Slow on purpose and kept readable next to the paper's equations. It is the oracle: the fast engine
(``unioncam.methods.unioncam``) and every kernel are tested against it, never the other way round. It shares no
code with the fast path beyond the model itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .api import Explanation

__all__ = ["unioncam_reference"]


def _up(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False, [h, w] → [H, W]."""
    return F.interpolate(a[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def _norm(m: torch.Tensor) -> torch.Tensor:
    """Min–max to [0, 1]; a constant map becomes all zeros."""
    lo, hi = m.min(), m.max()
    if hi == lo:
        return torch.zeros_like(m)
    return (m - lo) / (hi - lo)


def unioncam_reference(
    model: nn.Module,
    image: torch.Tensor,
    target: int | None = None,
    theta: float = 10.0,
    layer: str | None = None,
    reshape=None,
) -> Explanation:
    """UnionCAM of one image ``[3, H, W]`` in ``[0, 1]``, exactly as ``unioncam-spec.md`` states it.

    ``reshape``: for a token layer, the function that turns its output into ``[1, K, h, w]`` (applied to
    the activation and to the gradient alike); default the model's ``layer_reshape(layer)`` if it has one.
    """
    layer = layer or model.default_layer
    module = dict(model.named_modules())[layer]
    if reshape is None and callable(getattr(model, "layer_reshape", None)):
        reshape = model.layer_reshape(layer)
    if reshape is None:
        reshape = lambda t: t  # noqa: E731 - already [1, K, h, w]
    H, W_ = image.shape[-2:]
    size = (H, W_)
    x = image[None].to(next(model.parameters()).device)

    def f(z: torch.Tensor, c: int) -> float:
        """f_c(z): softmax probability of class c, in float32."""
        with torch.no_grad():
            return model(z[None]).float().softmax(-1)[0, c].item()

    # One forward with the activation as a leaf, then the gradient of the logit w.r.t. it.
    saved = {}

    def hook(_m, _i, out):
        saved["A"] = out.detach().requires_grad_(True)
        return saved["A"].clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)[0]
    finally:
        handle.remove()
    c = int(logits.argmax()) if target is None else int(target)
    score = logits.detach().float().softmax(-1)[c].item()
    grad = reshape(torch.autograd.grad(logits[c], saved["A"])[0])[0].float()  # W, [K, h, w]
    A = reshape(saved["A"].detach())[0].float()  # [K, h, w]
    K = A.shape[0]

    # AMD: eqs. 1–3, channel by channel.
    L_den = torch.zeros(A.shape[1:], device=A.device)
    removed = 0
    for k in range(K):
        Wk = grad[k]
        p_k = torch.quantile(Wk.flatten(), theta / 100.0)  # eq. 1 threshold, linear interpolation
        D = torch.where(Wk >= p_k, Wk, torch.zeros_like(Wk))  # eq. 1
        removed += int((Wk < p_k).sum())
        S = torch.relu(D).sum()
        alpha = torch.where(D > 0, 1.0 / S, torch.zeros_like(D)) if S > 0 else torch.zeros_like(D)  # eq. 3
        L_den += alpha * torch.relu(D) * A[k]  # eq. 2, Hadamard products
    Lh_den = _norm(_up(torch.relu(L_den), size))

    # Black-image score b = f_c(0).
    b = f(torch.zeros_like(x[0]), c)

    # Region map: one masked forward per non-constant channel.
    L_reg = torch.zeros(size, device=A.device)
    active = 0
    for k in range(K):
        U = _up(A[k], size)
        # U_k is constant when A_k is (the bilinear weights' rounding can make it wobble by an ulp).
        if A[k].max() == A[k].min() or U.max() == U.min():
            continue
        active += 1
        s_k = f(x[0] * _norm(U), c)
        L_reg += s_k * U
    Lh_reg = _norm(torch.relu(L_reg))

    # AMU: eqs. 4–6.
    beta_den = f(x[0] * Lh_den, c) - b
    beta_reg = f(x[0] * Lh_reg, c) - b
    Lh_union = _norm(torch.relu(beta_den * Lh_den + beta_reg * Lh_reg))

    # AMS: eqs. 7–8.
    beta_union = f(x[0] * Lh_union, c) - b
    union_wins = beta_union > beta_reg
    saliency = Lh_union if union_wins else Lh_reg

    details = {
        "layer": layer,
        "beta_denoise": beta_den,
        "beta_region": beta_reg,
        "beta_union": beta_union,
        "baseline_score": b,
        "selected": "union" if union_wins else "region",
        "active_channels": active,
        "denoised_fraction": removed / grad.numel(),
        "theta": float(theta),
        "masked_forwards": active + 3,
        "channels": K,
    }
    return Explanation(saliency.float().cpu(), c, score, "unioncam", details)
