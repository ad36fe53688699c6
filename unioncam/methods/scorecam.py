"""Score-CAM (Wang et al. 2020): each channel's map, up-sampled and normalised, masks the image."""

from __future__ import annotations

import torch

from ..core.capture import Pass
from ..core.scorer import Scorer
from ..kernels import masked_inputs, minmax_norm, up, upsampled_range
from .base import CommonDetails, Method, Options, Result, register

__all__ = ["ScoreCAM", "ScoreCAMDetails", "region_map"]


class ScoreCAMDetails(CommonDetails):
    active_channels: int  #: channels scored (the others have a constant map and weigh 0)


def _varies(acts: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: whether ``A_k`` is non-constant.

    Bilinear weights are rounded, so ``up`` of a constant map can wobble by an ulp; min–max would blow that
    wobble up into a 0/1 noise mask. Up-sampling maps a constant map to a constant one, so a channel with
    constant activations is pruned whatever the rounding says.
    """
    flat = acts.flatten(2)
    return flat.amax(-1) > flat.amin(-1)


def region_map(p: Pass, scorer: Scorer) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-CAM's region map ``Lh_reg`` ``[B, H, W]`` and the active (unpruned) channel count per image.

    ``s_k = f_c(x ⊙ norm(up(A_k)))`` for every channel whose up-sampled map is not constant (the others
    weigh 0, exactly). ``L_reg = Σ s_k up(A_k) = up(Σ s_k A_k)``: summed at ``h×w``, up-sampled once.
    """
    B, K = p.acts.shape[:2]
    lo, hi = upsampled_range(p.acts, p.size)
    active = (hi > lo) & _varies(p.acts)
    b_idx, k_idx = active.nonzero(as_tuple=True)  # the one host sync of the region map
    scorer.skip(B * K - b_idx.numel())  # pruned channels: the progress total shrinks to what will run
    lo_a, hi_a = lo[b_idx, k_idx], hi[b_idx, k_idx]
    scores = scorer(
        b_idx.numel(),
        lambda i, j: masked_inputs(p.x, p.acts, b_idx[i:j], k_idx[i:j], lo_a[i:j], hi_a[i:j],
                                   out_dtype=scorer.mask_dtype, normalize=scorer.normalize),
        p.targets[b_idx],
        normalized=scorer.normalize is not None,
        # The fixed-chunk path builds each chunk straight into its reused (or graph's static) input.
        fill=lambda i, j, out: masked_inputs(p.x, p.acts, b_idx[i:j], k_idx[i:j], lo_a[i:j], hi_a[i:j],
                                             out_dtype=scorer.mask_dtype, normalize=scorer.normalize, out=out),
    )
    s = torch.zeros(B, K, device=p.x.device, dtype=torch.float32)
    s[b_idx, k_idx] = scores
    l_reg = up(torch.einsum("bk,bkhw->bhw", s, p.acts.float()), p.size)
    return minmax_norm(l_reg.clamp_min(0)), active.sum(1)


@register
class ScoreCAM(Method):
    """Score-CAM: ``norm(relu(Σ_k f_c(x ⊙ norm(up(A_k))) · up(A_k)))``, no gradients."""

    name = "scorecam"
    rank = 2
    needs_gradients = False
    masked = True
    Details = ScoreCAMDetails

    def planned_forwards(self, channels: int) -> int:
        return channels

    def run(self, p: Pass, scorer: Scorer, options: Options) -> Result:
        saliency, active = region_map(p, scorer)
        return Result(saliency, {"active_channels": active, "masked_forwards": active})
