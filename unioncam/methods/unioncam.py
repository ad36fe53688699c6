"""UnionCAM (Hu et al. 2024): denoise (AMD) → union (AMU) → select (AMS), as ``docs/unioncam-spec.md`` says.

``unioncam.reference`` is the literal version this one is tested against.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..core.capture import Pass, black_probs
from ..core.scorer import Scorer
from ..kernels import denoise, minmax_norm
from .base import CommonDetails, Method, Options, Result, final, register
from .scorecam import region_map

__all__ = ["UnionCAM", "UnionCAMDetails", "beta_tie", "select", "union"]


class UnionCAMDetails(CommonDetails):
    beta_denoise: float  #: ``β_den = f_c(x ⊙ Lh_den) − b``
    beta_region: float  #: ``β_reg = f_c(x ⊙ Lh_reg) − b``
    beta_union: float  #: ``β_union = f_c(x ⊙ Lh_union) − b``
    baseline_score: float  #: ``b = f_c(black image)``
    selected: Literal["union", "region"]  #: the map AMS kept
    beta_tie: bool  #: β_union and β_reg are equal to float32 rounding: the strict rule decided a tie
    active_channels: int  #: channels with a non-constant map (scored for the region map)
    denoised_fraction: float  #: share of gradient entries the θ-percentile threshold removed
    denoised_positive_fraction: float  #: … of the positive ones
    theta: float  #: the θ used


def union(lh_den: torch.Tensor, lh_reg: torch.Tensor, beta_den: torch.Tensor, beta_reg: torch.Tensor) -> torch.Tensor:
    """AMU (eq. 6): ``Lh_union = norm(relu(β_den·Lh_den + β_reg·Lh_reg))`` for maps ``[B, H, W]``, β's ``[B]``."""
    return minmax_norm((beta_den[:, None, None] * lh_den + beta_reg[:, None, None] * lh_reg).clamp_min(0))


def select(lh_union: torch.Tensor, lh_reg: torch.Tensor, beta_union: torch.Tensor,
           beta_reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AMS (eq. 8): the union map where ``β_union > β_reg`` (strictly), else the region map.

    Returns ``(saliency [B, H, W], union_selected [B] bool)``.
    """
    chosen = beta_union > beta_reg
    return torch.where(chosen[:, None, None], lh_union, lh_reg), chosen


def beta_tie(beta_union: float, beta_reg: float, baseline: float) -> bool:
    """Whether ``β_union`` and ``β_reg`` are equal to float32 rounding: a tie, whichever map AMS kept.

    Each β is a float32 probability minus ``b`` (``f − b``), so each carries a rounding error of a few
    units in the last place of the larger of ``f`` and ``b``; two β's closer than 4 such units cannot be
    told apart. AMS still decides by its strict rule (:func:`select`); this only says that the decision
    was a tie, so that it is not reported as a win.
    """
    scale = max(abs(beta_union + baseline), abs(beta_reg + baseline), abs(baseline), abs(beta_union), abs(beta_reg))
    return abs(beta_union - beta_reg) <= 4 * torch.finfo(torch.float32).eps * scale


@register
class UnionCAM(Method):
    """UnionCAM: the denoised gradient map and Score-CAM's region map, united by their score gains."""

    name = "unioncam"
    rank = 0
    masked = True
    Details = UnionCAMDetails

    def run(self, p: Pass, scorer: Scorer, options: Options) -> Result:
        assert p.grads is not None
        B = p.x.shape[0]
        baseline = black_probs(scorer.model, p.size, p.x.device, p.x.dtype)[p.targets]
        # AMD (eqs. 1–3)
        l_den, removed, removed_pos = denoise(p.grads, p.acts, options.theta)
        lh_den = final(l_den, p.size)
        # Region map (Score-CAM)
        lh_reg, active = region_map(p, scorer)
        # AMU (eqs. 4–6): β_den and β_reg from one batch of 2B.
        # The β's decide the union's weights and the AMS choice: their 3B forwards run in float32 at any
        # precision (a rounded score can flip a near-tie), a sliver of the ~500 forwards per image.
        pair = scorer.masked(torch.cat([p.x, p.x]), torch.cat([lh_den, lh_reg]), torch.cat([p.targets, p.targets]),
                             fp32=True)
        beta_den, beta_reg = pair[:B] - baseline, pair[B:] - baseline
        lh_union = union(lh_den, lh_reg, beta_den, beta_reg)
        # AMS (eqs. 7–8)
        beta_union = scorer.masked(p.x, lh_union, p.targets, fp32=True) - baseline
        saliency, chosen = select(lh_union, lh_reg, beta_union, beta_reg)
        return Result(saliency, {
            "beta_denoise": beta_den,
            "beta_region": beta_reg,
            "beta_union": beta_union,
            "baseline_score": baseline,
            "selected": chosen,
            "active_channels": active,
            "denoised_fraction": removed,
            "denoised_positive_fraction": removed_pos,
            "masked_forwards": active + 3,  # region map, β_den, β_reg, β_union
        })

    def planned_forwards(self, channels: int) -> int:
        return channels + 3  # one per channel (the region map), β_den, β_reg, β_union

    def details(self, per_image: dict[str, Any], options: Options) -> dict[str, Any]:
        tie = beta_tie(per_image["beta_union"], per_image["beta_region"], per_image["baseline_score"])
        return {**per_image, "selected": "union" if per_image["selected"] else "region", "beta_tie": tie,
                "theta": options.theta}
