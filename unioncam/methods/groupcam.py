"""Group-CAM (Zhang et al. 2021) as its authors' code does it."""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur

from ..core.capture import Pass
from ..core.scorer import Scorer
from ..kernels import minmax_norm, up
from .base import CommonDetails, Method, Options, Result, register

__all__ = ["GROUPCAM_BLUR", "GROUPCAM_GROUPS", "GROUPCAM_PERCENTILE", "GroupCAM", "GroupCAMDetails"]

#: Group-CAM's settings, as its authors' code has them.
GROUPCAM_GROUPS = 32
GROUPCAM_PERCENTILE = 70.0
GROUPCAM_BLUR = (51, 50.0)  # kernel size, sigma


class GroupCAMDetails(CommonDetails):
    groups: int  #: channel groups ``G``
    active_groups: int  #: groups whose map is not constant (scored)
    blur_score: float  #: ``f_c(blur(x))``, the baseline each group's score is taken against


@register
class GroupCAM(Method):
    """Grad-CAM-weighted activations summed in 32 channel groups, each scored as a mask over a blurred image.

    Each group map keeps its values above its 70th percentile, is up-sampled and normalised into
    ``M_g``; the model scores ``x ⊙ M_g + blur(x) ⊙ (1 − M_g)`` against the blurred image;
    ``L = Σ_g (f_c(·) − f_c(blur(x))) M_g``, then ``norm(relu(L))``.
    """

    name = "groupcam"
    rank = 3
    masked = True
    Details = GroupCAMDetails

    def planned_forwards(self, channels: int) -> int:
        size = -(-channels // GROUPCAM_GROUPS)  # torch.chunk's group size
        return -(-channels // size) + 1  # one per group, and the blurred image

    def run(self, p: Pass, scorer: Scorer, options: Options) -> Result:
        assert p.grads is not None
        B = p.x.shape[0]
        weighted = p.grads.float().mean((2, 3), keepdim=True) * p.acts.float()
        groups = torch.stack([g.sum(1) for g in weighted.chunk(GROUPCAM_GROUPS, dim=1)], 1).clamp_min(0)  # [B,G,h,w]
        G = groups.shape[1]
        thr = torch.quantile(groups.flatten(2), GROUPCAM_PERCENTILE / 100.0, dim=-1)[..., None, None]
        groups = torch.where(groups > thr, groups, 0)
        u = up(groups, p.size)  # [B, G, H, W]: G ≤ 32 maps, small enough to keep
        flat = u.flatten(2)
        active = flat.amax(-1) > flat.amin(-1)
        masks = minmax_norm(u)
        k = min(GROUPCAM_BLUR[0], 2 * min(p.size) - 1)  # reflect padding needs kernel // 2 < side
        blurred = gaussian_blur(p.x, [k, k], [GROUPCAM_BLUR[1]] * 2) if k >= 3 else p.x
        b_idx, g_idx = active.nonzero(as_tuple=True)
        scorer.skip(B * G - b_idx.numel())  # constant groups are not scored
        base = scorer(B, lambda i, j: blurred[i:j], p.targets)

        def build(i: int, j: int) -> torch.Tensor:
            m = masks[b_idx[i:j], g_idx[i:j]][:, None].to(p.x.dtype)
            return p.x[b_idx[i:j]] * m + blurred[b_idx[i:j]] * (1 - m)

        scores = scorer(b_idx.numel(), build, p.targets[b_idx]) - base[b_idx]
        w = torch.zeros(B, G, device=p.x.device)
        w[b_idx, g_idx] = scores
        saliency = minmax_norm(torch.einsum("bg,bghw->bhw", w, masks).clamp_min(0))
        n_active = active.sum(1)
        return Result(saliency, {"groups": G, "active_groups": n_active, "blur_score": base,
                                 "masked_forwards": n_active + 1})
