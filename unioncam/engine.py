"""The fast engine: UnionCAM and the CAM baselines, batched.

One core does what every method shares — capture the layer's activations ``A`` and the logit gradient
``W`` in one forward and a head-only backward, score masked inputs in chunks, up-sample and normalise —
and each method only says how it weights activations. ``unioncam.reference`` is the literal version of
UnionCAM that this file is tested against.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from .errors import InvalidInputError
from .io import to_pixels
from .kernels import denoise, masked_inputs, minmax_norm, up, upsampled_range
from .models import default_layer

__all__ = ["METHODS", "Explanation", "explain", "explain_batch", "black_probs", "union", "select", "validate_theta"]

METHODS: tuple[str, ...] = ("unioncam", "gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "groupcam")

#: Group-CAM's settings, as its authors' code has them.
GROUPCAM_GROUPS = 32
GROUPCAM_PERCENTILE = 70.0
GROUPCAM_BLUR = (51, 50.0)  # kernel size, sigma


@dataclass
class Explanation:
    """One explanation.

    Attributes:
        saliency: float32 ``[H, W]`` in ``[0, 1]``, on CPU.
        target: the explained class.
        score: softmax probability of ``target`` on the image.
        method: which method made it.
        details: what a user needs to trust it (for UnionCAM: the β's, the black-image score, which map
            was selected, active channels, the share of gradient entries the threshold removed, θ, layer).
    """

    saliency: torch.Tensor
    target: int
    score: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- validation


def validate_method(method: Any) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise InvalidInputError("method", f"{method!r} is not a known method", ", ".join(METHODS))
    return method.lower()


def validate_theta(theta: Any) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta):
        raise InvalidInputError("theta", f"{theta!r} is not a finite number", "a number in [0, 100]")
    if not 0.0 <= float(theta) <= 100.0:
        raise InvalidInputError("theta", f"{theta!r} is outside [0, 100]", "a number in [0, 100]")
    return float(theta)


def _validate_image(image: Any, name: str = "image") -> torch.Tensor:
    if isinstance(image, Image.Image):
        return to_pixels(image.convert("RGB"), size=None)
    if not isinstance(image, torch.Tensor):
        raise InvalidInputError(
            name, f"is a {type(image).__name__}", "a float tensor [3, H, W] in [0, 1] or a PIL image"
        )
    if image.dim() != 3 or image.shape[0] != 3:
        raise InvalidInputError(name, f"has shape {tuple(image.shape)}", "a float tensor [3, H, W] in [0, 1]")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise InvalidInputError(name, f"has shape {tuple(image.shape)}", "H, W ≥ 1")
    if not image.is_floating_point():
        raise InvalidInputError(name, f"has dtype {image.dtype}", "float pixels in [0, 1] (divide uint8 by 255)")
    if not bool(torch.isfinite(image).all()):
        raise InvalidInputError(name, "has NaN or infinite values", "finite pixels in [0, 1]")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(
            name, f"has values in [{lo:g}, {hi:g}]", "pixels in [0, 1] (pixel space, not ImageNet-normalised)"
        )
    return image


def _resolve_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    name = default_layer(model) if layer is None else layer
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or name == "":
        some = [n for n in modules if n][-8:]
        raise InvalidInputError(
            "layer", f"{name!r} is not a module of this model", f"a name from model.named_modules(), e.g. {some}"
        )
    return name, modules[name]


def _validate_targets(targets: Sequence[Any], num_classes: int | None) -> None:
    for t in targets:
        if t is None:
            continue
        accepted = "an integer class index" if num_classes is None else f"an integer in [0, {num_classes - 1}]"
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidInputError("target", f"{t!r} is not a class index", accepted)
        if t < 0 or (num_classes is not None and t >= num_classes):
            raise InvalidInputError("target", f"{t} is out of range", accepted)


# -------------------------------------------------------------------------------------------- the core


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters never get gradients: only the layer's activation does, so backward runs through the head."""
    flags = [(p, p.requires_grad) for p in model.parameters() if p.requires_grad]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _capture(module: nn.Module, name: str, need_grad: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s output as ``A``; when ``need_grad``, as a leaf that the logits' graph starts from."""
    store: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidInputError("layer", f"{name!r} outputs {shape}", "a layer whose output is [N, C, h, w]")
        a = out.detach()
        if need_grad:
            a.requires_grad_(True)
        store["A"] = a
        # A clone goes on, so that an in-place op after the layer (ReLU(inplace=True)) cannot touch A.
        return a.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


_BLACK: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _model_state_key(model: nn.Module) -> tuple:
    # In-place updates (load_state_dict, optimiser steps) bump a tensor's version: the cache notices them.
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers())) + (model.training,)


def black_probs(model: nn.Module, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Softmax of the model on a black image of ``size``: ``b = f_c(0)`` for every ``c``, computed once."""
    per_model = _BLACK.setdefault(model, {})
    key = (tuple(size), str(device), dtype, _model_state_key(model))
    if key not in per_model:
        per_model.clear()  # an entry for old weights or another size is never used again
        with torch.no_grad():
            per_model[key] = model(torch.zeros(1, 3, *size, device=device, dtype=dtype)).float().softmax(-1)[0]
    return per_model[key]


#: Masked inputs per forward when ``batch_size`` is not given. A GPU needs large batches to fill up; a
#: CPU is compute-bound at any batch size (VGG16 at 224²: 198–215 ms per image for batches of 1–32 on
#: 2 cores) and large batches only spill caches, so it gets small ones.
DEFAULT_BATCH_SIZE = {"cuda": 64, "cpu": 8}


def _batch_size(batch_size: Any, device: torch.device) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE.get(device.type, 64)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError("batch_size", f"{batch_size!r}", "an integer ≥ 1, or None for the device's default")
    return batch_size


#: ``precision`` → the autocast dtype of the masked forwards (``None``: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def validate_precision(precision: Any) -> str:
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise InvalidInputError("precision", f"{precision!r} is not a known precision", ", ".join(PRECISIONS))
    return precision.lower()


class _Runner(nn.Module):
    """Calls ``model.<method>``: a module to hand ``torch.func.functional_call`` (parameters ``model.*``)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


class _Scorer:
    """Scores inputs ``f_c(z)`` in chunks of ``batch_size``; fp32 softmax; no host sync per chunk.

    ``precision`` other than fp32 runs the masked forwards under autocast, with the conv/linear weights
    cast once per scorer rather than on every forward; the head and the softmax stay float32, and a
    call with ``fp32=True`` runs wholly in float32.
    The model runs channels-last (with cuDNN autotuning on CUDA). When the model offers
    ``forward_normalized`` (and its ``mean``/``std``), the mask kernels normalise as they build the
    inputs and :attr:`normalize` says so.
    """

    def __init__(self, model: nn.Module, batch_size: int, progress: Any = None, precision: str = "fp32") -> None:
        self.model = model
        self.batch_size = batch_size
        self.progress = progress
        self.device = _model_device(model)
        self.autocast_dtype = PRECISIONS[precision]
        fused = getattr(model, "forward_normalized", None)
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        self.normalize = (mean, std) if callable(fused) and isinstance(mean, torch.Tensor) and isinstance(
            std, torch.Tensor) else None
        # Masked inputs straight in the autocast dtype only when the model does no float math before its
        # first layer (the fused-normalisation case); otherwise in the model's own dtype.
        self.mask_dtype = (self.autocast_dtype if self.normalize is not None and self.autocast_dtype is not None
                           else _model_dtype(model))
        # The last Linear (the head) stays float32 under autocast; found once, not per chunk.
        self._head = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
        self._runners = {False: _Runner(model, "forward"),
                         True: _Runner(model, "forward_normalized") if self.normalize is not None else None}
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a handful of fixed shapes, hundreds of forwards each

    @functools.cached_property
    def _low_params(self) -> dict[str, torch.Tensor]:
        """The convolutions' and linear layers' weights and biases (the head's excepted), in the autocast dtype.

        Made on the first half-precision forward, so a scorer that never runs one (the gradient
        methods, fp32) casts nothing.

        Autocast runs these layers in the low dtype and casts their float32 parameters on every call
        (it caches casts only of parameters that require grad): for VGG16 138 M values per chunk, about
        15 % of a bf16 forward on a CPU. Cast once here and handed to the forwards, they are the very
        tensors autocast would have made, so the scores are bit-identical.
        """
        out = {}
        for mname, mod in self.model.named_modules():
            if mod is self._head or not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            for pname, param in mod.named_parameters(recurse=False):
                if param.is_floating_point() and param.dtype != self.autocast_dtype:
                    out[f"model.{mname}.{pname}" if mname else f"model.{pname}"] = param.detach().to(
                        self.autocast_dtype)
        return out

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        """Autocast the forwards, except the model's last ``nn.Linear`` (its head), which runs in float32.

        Logits rounded to bf16 (8 significant bits) would move a softmax score by up to ~e^(|logit|/256):
        several percent for logits of 10–30. The head is a sliver of the cost, so it stays exact.
        """
        if self.autocast_dtype is None:
            yield
            return
        head = self._head
        device_type = self.device.type

        def fp32_head(mod: nn.Module, inputs: tuple, _out: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device_type, enabled=False):
                bias = None if mod.bias is None else mod.bias.float()
                return F.linear(inputs[0].float(), mod.weight.float(), bias)

        handle = head.register_forward_hook(fp32_head) if head is not None else None
        try:
            with torch.autocast(device_type=device_type, dtype=self.autocast_dtype):
                yield
        finally:
            if handle is not None:
                handle.remove()

    def __call__(self, n: int, build: Callable[[int, int], torch.Tensor], targets: torch.Tensor,
                 normalized: bool = False, fp32: bool = False) -> torch.Tensor:
        """Scores of ``n`` inputs made by ``build(i, j)``; ``normalized``: they are already normalised.

        ``fp32``: run these forwards in float32 whatever the precision (the few forwards that decide).
        """
        runner = self._runners[normalized]
        assert runner is not None, "normalized inputs need a model with forward_normalized"
        params = {} if fp32 or self.autocast_dtype is None else self._low_params
        out = torch.empty(n, device=targets.device, dtype=torch.float32)
        i, bs = 0, self.batch_size
        while i < n:
            j = min(n, i + bs)
            try:
                with torch.no_grad(), (contextlib.nullcontext() if fp32 else self._autocast()):
                    # Channels-last inputs for the channels-last convolutions explain_batch set up.
                    logits = torch.func.functional_call(
                        runner, params, (build(i, j).contiguous(memory_format=torch.channels_last),))
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)  # back off rather than fail; the result does not depend on chunking
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            out[i:j] = logits.float().softmax(-1).gather(1, targets[i:j, None]).squeeze(1)
            if self.progress is not None:
                self.progress.update(j - i)
            i = j
        return out

    def masked(self, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
               fp32: bool = False) -> torch.Tensor:
        """``f_c(x ⊙ map)`` for maps ``[n, H, W]`` of images ``[n, 3, H, W]``."""
        return self(maps.shape[0], lambda i, j: images[i:j] * maps[i:j, None].to(images.dtype), targets,
                    fp32=fp32)


@dataclass
class _Pass:
    """What one forward + backward over a batch of same-size images gives every method."""

    x: torch.Tensor  # [B, 3, H, W]
    targets: torch.Tensor  # [B] long
    probs: torch.Tensor  # [B, classes] float32
    acts: torch.Tensor  # A [B, K, h, w]
    grads: torch.Tensor | None  # W = ∂ logit_c / ∂A, [B, K, h, w]

    @property
    def size(self) -> tuple[int, int]:
        return (self.x.shape[-2], self.x.shape[-1])


def _forward(model: nn.Module, x: torch.Tensor, targets: list[int | None], layer: tuple[str, nn.Module],
             need_grad: bool) -> _Pass:
    name, module = layer
    with _frozen(model), _capture(module, name, need_grad) as store, torch.set_grad_enabled(need_grad):
        logits = model(x)
        if "A" not in store:
            raise InvalidInputError("layer", f"{name!r} did not run in the model's forward", "a layer on the forward path")
        probs = logits.detach().float().softmax(-1)
        _validate_targets(targets, probs.shape[1])
        t = probs.argmax(1)
        given = [(i, c) for i, c in enumerate(targets) if c is not None]
        if given:
            idx = torch.tensor([i for i, _ in given], device=x.device)
            t[idx] = torch.tensor([c for _, c in given], device=x.device)
        grads = None
        if need_grad:
            # Images are independent in eval mode, so one backward of the summed logits gives each its own W.
            (grads,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store["A"])
    return _Pass(x=x, targets=t, probs=probs, acts=store["A"].detach(), grads=grads)


def _final(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``norm(up(relu(map)))``."""
    return minmax_norm(up(raw.float().clamp_min(0), size))


# ------------------------------------------------------------------------- gradient-weighted baselines


def _gradcam(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: channel weight = spatial mean of the gradient."""
    return (W.mean((2, 3), keepdim=True) * A).sum(1)


def _gradcampp(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ with the score ``Y = exp(logit)``.

    Its derivatives are ``exp(logit)·W^n``, so in ``α = ∂²Y / (2∂²Y + Σ A ∂³Y)`` the exponential cancels,
    and it scales every channel weight by the same positive factor, which ``norm`` removes: neither is
    materialised (``exp`` of a large logit would overflow).
    """
    g2, g3 = W.pow(2), W.pow(3)
    denom = 2 * g2 + A.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1), 0)
    weights = (alpha * W.clamp_min(0)).sum((2, 3), keepdim=True)
    return (weights * A).sum(1)


def _xgradcam(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM: channel weight = Σ_ij (A_ij / Σ A) W_ij (0 for a channel whose activations sum to 0)."""
    s = A.sum((2, 3), keepdim=True)
    weights = torch.where(s != 0, (W * A).sum((2, 3), keepdim=True) / torch.where(s != 0, s, 1), 0)
    return (weights * A).sum(1)


def _layercam(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """LayerCAM: element-wise ``relu(W) ⊙ A`` summed over channels."""
    return (W.clamp_min(0) * A).sum(1)


_GRADIENT_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": _gradcam,
    "gradcam++": _gradcampp,
    "xgradcam": _xgradcam,
    "layercam": _layercam,
}


# --------------------------------------------------------------------------- score-weighted methods


def _varies(acts: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: whether ``A_k`` is non-constant.

    Bilinear weights are rounded, so ``up`` of a constant map can wobble by an ulp; min–max would blow that
    wobble up into a 0/1 noise mask. Up-sampling maps a constant map to a constant one, so a channel with
    constant activations is pruned whatever the rounding says.
    """
    flat = acts.flatten(2)
    return flat.amax(-1) > flat.amin(-1)


def _region_map(p: _Pass, scorer: _Scorer) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-CAM's region map ``Lh_reg`` ``[B, H, W]`` and the active (unpruned) channel count per image.

    ``s_k = f_c(x ⊙ norm(up(A_k)))`` for every channel whose up-sampled map is not constant (the others
    weigh 0, exactly). ``L_reg = Σ s_k up(A_k) = up(Σ s_k A_k)``: summed at ``h×w``, up-sampled once.
    """
    B, K = p.acts.shape[:2]
    lo, hi = upsampled_range(p.acts, p.size)
    active = (hi > lo) & _varies(p.acts)
    b_idx, k_idx = active.nonzero(as_tuple=True)  # the one host sync of the region map
    lo_a, hi_a = lo[b_idx, k_idx], hi[b_idx, k_idx]
    scores = scorer(
        b_idx.numel(),
        lambda i, j: masked_inputs(p.x, p.acts, b_idx[i:j], k_idx[i:j], lo_a[i:j], hi_a[i:j],
                                   out_dtype=scorer.mask_dtype, normalize=scorer.normalize),
        p.targets[b_idx],
        normalized=scorer.normalize is not None,
    )
    s = torch.zeros(B, K, device=p.x.device, dtype=torch.float32)
    s[b_idx, k_idx] = scores
    l_reg = up(torch.einsum("bk,bkhw->bhw", s, p.acts.float()), p.size)
    return minmax_norm(l_reg.clamp_min(0)), active.sum(1)


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


def _unioncam(p: _Pass, scorer: _Scorer, theta: float, baseline: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    assert p.grads is not None
    B = p.x.shape[0]
    # AMD (eqs. 1–3)
    l_den, removed, removed_pos = denoise(p.grads, p.acts, theta)
    lh_den = _final(l_den, p.size)
    # Region map (Score-CAM)
    lh_reg, active = _region_map(p, scorer)
    # AMU (eqs. 4–6): β_den and β_reg from one batch of 2B
    # The β's decide the union's weights and the AMS choice: their 3B forwards run in float32 at any
    # precision (a rounded score can flip a near-tie), a sliver of the ~500 forwards per image.
    pair = scorer.masked(torch.cat([p.x, p.x]), torch.cat([lh_den, lh_reg]), torch.cat([p.targets, p.targets]),
                         fp32=True)
    beta_den, beta_reg = pair[:B] - baseline, pair[B:] - baseline
    lh_union = union(lh_den, lh_reg, beta_den, beta_reg)
    # AMS (eqs. 7–8)
    beta_union = scorer.masked(p.x, lh_union, p.targets, fp32=True) - baseline
    saliency, chosen = select(lh_union, lh_reg, beta_union, beta_reg)
    stats = {
        "beta_denoise": beta_den,
        "beta_region": beta_reg,
        "beta_union": beta_union,
        "baseline_score": baseline,
        "selected": chosen,
        "active_channels": active,
        "denoised_fraction": removed,
        "denoised_positive_fraction": removed_pos,
        "masked_forwards": active + 3,  # region map, β_den, β_reg, β_union
    }
    return saliency, stats


def _scorecam(p: _Pass, scorer: _Scorer) -> tuple[torch.Tensor, dict[str, Any]]:
    saliency, active = _region_map(p, scorer)
    return saliency, {"active_channels": active, "masked_forwards": active}


def _groupcam(p: _Pass, scorer: _Scorer) -> tuple[torch.Tensor, dict[str, Any]]:
    """Group-CAM (Zhang et al. 2021) as its authors' code does it.

    Grad-CAM-weighted activations are summed in 32 channel groups; each group map keeps its values above
    its 70th percentile, is up-sampled and normalised into ``M_g``; the model scores
    ``x ⊙ M_g + blur(x) ⊙ (1 − M_g)`` against the blurred image; ``L = Σ_g (f_c(·) − f_c(blur(x))) M_g``,
    then ``norm(relu(L))``.
    """
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
    base = scorer(B, lambda i, j: blurred[i:j], p.targets)
    b_idx, g_idx = active.nonzero(as_tuple=True)

    def build(i: int, j: int) -> torch.Tensor:
        m = masks[b_idx[i:j], g_idx[i:j]][:, None].to(p.x.dtype)
        return p.x[b_idx[i:j]] * m + blurred[b_idx[i:j]] * (1 - m)

    scores = scorer(b_idx.numel(), build, p.targets[b_idx]) - base[b_idx]
    w = torch.zeros(B, G, device=p.x.device)
    w[b_idx, g_idx] = scores
    saliency = minmax_norm(torch.einsum("bg,bghw->bhw", w, masks).clamp_min(0))
    n_active = active.sum(1)
    return saliency, {"groups": G, "active_groups": n_active, "blur_score": base, "masked_forwards": n_active + 1}


# ------------------------------------------------------------------------------------------- public


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def explain_batch(
    model: nn.Module,
    images: Sequence[torch.Tensor | Image.Image],
    targets: Sequence[int | None] | None = None,
    method: str = "unioncam",
    theta: float = 10.0,
    layer: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> list[Explanation]:
    """Explain several images at once; their masked inputs share chunks.

    Args and result as :func:`explain`, with ``images`` a sequence and ``targets`` one entry per image
    (``None`` → the arg-max class). Images of different sizes are processed in groups of equal size.
    """
    method = validate_method(method)
    theta = validate_theta(theta)
    precision = validate_precision(precision)
    _batch_size(batch_size, torch.device("cpu"))  # validate before any work
    if isinstance(images, Image.Image) or (isinstance(images, torch.Tensor) and images.dim() != 4):
        raise InvalidInputError("images", "is a single image", "a list of images (use explain() for one)")
    images = list(images)
    if targets is None:
        targets = [None] * len(images)
    targets = list(targets)
    if len(targets) != len(images):
        raise InvalidInputError("targets", f"has {len(targets)} entries for {len(images)} images", "one per image")
    pixels = [_validate_image(im, f"images[{i}]" if len(images) > 1 else "image") for i, im in enumerate(images)]
    _validate_targets(targets, None)  # types now; the upper bound once the model's class count is known
    layer_ref = _resolve_layer(model, layer)
    if device is not None:
        model.to(device)
    # Channels-last convolutions are faster on GPUs and CPUs alike (VGG16 on this project's 2-core CPU:
    # 162 vs 198 ms per 224² image). It changes the layout of the model's weights, not their values, and
    # is set before the gradient pass so that every forward of an explanation runs the same kernels.
    model.to(memory_format=torch.channels_last)
    dev, dtype = _model_device(model), _model_dtype(model)
    batch_size = _batch_size(batch_size, dev)

    results: list[Explanation | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, px in enumerate(pixels):
        groups.setdefault(tuple(px.shape[-2:]), []).append(i)

    bar = None
    if progress and method in ("unioncam", "scorecam", "groupcam"):
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"{method} masked forwards", unit="fwd", leave=False)
    try:
        for size, idx in groups.items():
            x = torch.stack([pixels[i] for i in idx]).to(dev, dtype)
            for res_i, res in zip(idx, _explain_group(model, x, [targets[i] for i in idx], method, theta,
                                                     layer_ref, batch_size, bar, precision)):
                results[res_i] = res
    finally:
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]


def _explain_group(model: nn.Module, x: torch.Tensor, targets: list[int | None], method: str, theta: float,
                   layer: tuple[str, nn.Module], batch_size: int, bar: Any,
                   precision: str = "fp32") -> list[Explanation]:
    start = time.perf_counter()
    need_grad = method != "scorecam"
    p = _forward(model, x, targets, layer, need_grad)
    scorer = _Scorer(model, batch_size, bar, precision)
    per_image: dict[str, Any] = {"masked_forwards": 0}
    if method in _GRADIENT_METHODS:
        saliency = _final(_GRADIENT_METHODS[method](p.acts.float(), p.grads.float()), p.size)  # type: ignore[union-attr]
    elif method == "scorecam":
        saliency, per_image = _scorecam(p, scorer)
    elif method == "groupcam":
        saliency, per_image = _groupcam(p, scorer)
    else:
        baseline = black_probs(model, p.size, x.device, x.dtype)[p.targets]
        saliency, per_image = _unioncam(p, scorer, theta, baseline)
    # Results reach the host once, at the end (no sync per chunk or per channel).
    saliency = saliency.float().cpu()
    target_l = p.targets.tolist()
    score_l = p.probs.gather(1, p.targets[:, None]).squeeze(1).tolist()
    per_image = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in per_image.items()}
    elapsed = time.perf_counter() - start
    B = x.shape[0]
    out = []
    for b in range(B):
        details: dict[str, Any] = {"layer": layer[0]}
        for k, v in per_image.items():
            details[k] = v[b] if isinstance(v, list) else v
        if method == "unioncam":
            details["selected"] = "union" if details["selected"] else "region"
            details["theta"] = theta
        details["channels"] = int(p.acts.shape[1])
        details["seconds"] = elapsed / B
        out.append(Explanation(saliency[b], int(target_l[b]), float(score_l[b]), method, details))
    return out


def explain(
    model: nn.Module,
    image: torch.Tensor | Image.Image,
    method: str = "unioncam",
    target: int | None = None,
    theta: float = 10.0,
    layer: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> Explanation:
    """Explain why ``model`` gives ``image`` the class ``target``.

    Args:
        model: a classifier taking pixel-space input ``[N, 3, H, W]`` in ``[0, 1]`` (see
            :func:`unioncam.load_vgg16`), in eval mode.
        image: float tensor ``[3, H, W]`` in ``[0, 1]``, or a PIL image (used at its own size).
        method: one of :data:`METHODS`.
        target: class index; ``None`` → the model's arg-max class.
        theta: AMD percentile θ in ``[0, 100]`` (UnionCAM only).
        layer: name from ``model.named_modules()``; ``None`` → ``model.default_layer``.
        batch_size: masked inputs per forward pass; ``None`` → 64 on CUDA, 8 on CPU (results do not
            depend on it).
        device: move the model there first; ``None`` → where the model is.
        progress: show a progress bar over masked forwards.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the autocast dtype of the masked forwards
            (the gradient pass, the model's head, every softmax and UnionCAM's three β forwards stay
            float32).

    Returns:
        :class:`Explanation`.

    Raises:
        InvalidInputError: a bad argument; the message names it and says what is accepted.
    """
    if isinstance(target, (list, tuple)):
        raise InvalidInputError("target", f"{target!r} is a sequence", "one class index or None")
    return explain_batch(model, [image], [target], method, theta, layer, batch_size, device, progress,
                         precision=precision)[0]
