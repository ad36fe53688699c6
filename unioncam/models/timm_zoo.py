"""timm models by name, ``timm/<name>``: pixel input ``[N, 3, H, W]`` in ``[0, 1]``, their CAM layer and reshape.

Everything a timm model needs here is read from what the model says about itself, never from a list of
names kept here:

* **Normalisation, input size, interpolation**: its ``pretrained_cfg`` (``mean``, ``std``, ``input_size``,
  ``interpolation``). :func:`load_timm` makes the model pixel-space the way :func:`~unioncam.models.pixel_model`
  does for torchvision: its class becomes a subclass whose ``forward`` normalises first and whose
  ``forward_normalized`` is timm's ``forward``; module names and state-dict keys stay timm's.
* **Default layer** (:func:`timm_default_layer`), by the model's *kind* (:func:`timm_kind`):

  - ``cnn`` and ``nhwc`` (ResNet, RegNet, EfficientNet, MobileNet, ConvNeXt, DenseNet; Swin and other
    channels-last stages): the module that produces ``forward_features``' output, the map the head pools
    (found by running ``forward_features`` once on the ``meta`` device, pass-through modules skipped);
  - ``tokens`` (ViT, DeiT, EVA, BEiT, …: a ``patch_embed`` and ``num_prefix_tokens``): the first
    normalisation of the last block of ``feature_info``. Under class-token pooling nothing after the last
    block's attention passes a gradient to the patch tokens, so a later layer would give blank
    gradient maps; this is the input of that attention (pytorch-grad-cam's advice for ViTs).

* **Reshape** (``layer_reshape(name)``): token outputs ``[N, P + h·w, C]`` lose their ``P =
  num_prefix_tokens`` prefix tokens (class, distillation and register tokens) and go onto the patch grid
  of the image the model last saw (``patch_embed``'s patch size: non-square grids and sizes other than
  the default work); channels-last outputs ``[N, h, w, C]`` of an ``nhwc`` model are permuted to
  ``[N, C, h, w]``.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidInputError
from .checkpoint import read_state_dict
from .zoo import _unzero_head, pixel_subclass

__all__ = [
    "PREFIX",
    "TIMM_FAMILIES",
    "families_table",
    "is_timm",
    "load_timm",
    "require_timm",
    "timm_cache_file",
    "timm_input_config",
    "timm_kind",
    "timm_default_layer",
]

#: The prefix of a timm model's name in :func:`unioncam.load_model` and ``--model``.
PREFIX = "timm/"

#: One small model per family the documentation's table describes (``docs/models.md``): its rows are
#: computed from these models by :func:`families_table`, not written by hand.
TIMM_FAMILIES: tuple[tuple[str, str], ...] = (
    ("ResNet / ResNeXt", "resnet50"),
    ("RegNet", "regnetx_002"),
    ("EfficientNet", "efficientnet_b0"),
    ("MobileNet-v3", "mobilenetv3_small_050"),
    ("ConvNeXt", "convnext_tiny"),
    ("DenseNet", "densenet121"),
    ("Swin (channels-last stages)", "swin_tiny_patch4_window7_224"),
    ("ViT", "vit_base_patch16_224"),
    ("ViT with registers", "vit_small_patch14_reg4_dinov2"),
    ("DeiT (distilled)", "deit_tiny_distilled_patch16_224"),
    ("EVA-02", "eva02_tiny_patch14_224"),
    ("BEiT", "beit_base_patch16_224"),
)


def is_timm(name: object) -> bool:
    """Whether ``name`` asks for a timm model (``timm/<name>``)."""
    return isinstance(name, str) and name.startswith(PREFIX) and len(name) > len(PREFIX)


def require_timm():
    """The ``timm`` module, or one sentence naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise RuntimeError("timm models need the timm package, which is not installed: "
                           "pip install 'unioncam[timm]' (or pip install timm)") from None
    return timm


def _bare(name: str) -> str:
    return name[len(PREFIX):] if is_timm(name) else name


def _check_name(timm, name: str) -> str:
    bare = _bare(name)
    if not timm.is_model(bare):
        close = timm.list_models(f"*{bare.split('.')[0][:12]}*")[:8]
        raise InvalidInputError("model", f"{name!r} is not a timm model",
                                f"timm/<name> with a name from timm.list_models(), e.g. "
                                f"{[PREFIX + c for c in close] or [PREFIX + 'resnet50', PREFIX + 'vit_base_patch16_224']}")
    return bare


def timm_input_config(name: str) -> dict:
    """``{"size": (H, W), "interpolation": str, "mean", "std"}`` of ``timm/<name>``'s default pretrained
    config, without building the model."""
    timm = require_timm()
    bare = _check_name(timm, name)
    cfg = timm.models.get_pretrained_cfg(bare)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    size = tuple(cfg.get("input_size") or (3, 224, 224))[-2:]
    return {"size": (int(size[0]), int(size[1])), "interpolation": str(cfg.get("interpolation") or "bilinear"),
            "mean": tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
            "std": tuple(cfg.get("std") or (0.229, 0.224, 0.225))}


# ------------------------------------------------------------------------------------ structure


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower()


def _feature_modules(model: nn.Module) -> list[str]:
    """The modules of timm's ``feature_info`` (the model's own list of its stages), in order."""
    info = getattr(model, "feature_info", None) or []
    out = []
    for entry in info:
        mod = entry.get("module") if isinstance(entry, dict) else None
        if mod and mod not in out:
            out.append(mod)
    return out


def timm_kind(model: nn.Module) -> str:
    """``tokens`` (a patch embedding and prefix tokens: ViT, DeiT, EVA, BEiT), ``nhwc`` (timm says its
    output is channels-last: Swin, …) or ``cnn``."""
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        return "tokens"
    if str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC":
        return "nhwc"
    return "cnn"


def _probe_size(model: nn.Module) -> tuple[int, int]:
    fixed = getattr(model, "input_size", None)
    if fixed is not None:
        return tuple(fixed)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))[-2:]


def _features_producer(model: nn.Module) -> str | None:
    """The module whose output is ``forward_features``' (the map the head pools), from one forward on
    the ``meta`` device (shapes only): the ``feature_info`` stage among the modules that output it (ConvNeXt
    ``stages.3``, not the ``stages`` around it), else the outermost of them (EfficientNet's ``bn2``, Swin's
    ``norm`` come after the last stage). Modules that hand their input on unchanged are skipped."""
    names = {m: n for n, m in model.named_modules() if n}
    fired: list[tuple[str, object]] = []

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor) and not any(a is out for a in args):
            fired.append((names[mod], out))

    handles = [m.register_forward_hook(hook) for m in names]
    state = {k: torch.empty_like(v, device="meta") for k, v in
             [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    x = torch.zeros(1, 3, *_probe_size(model), device="meta")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            feats = _call_features(model, state, x)
    except Exception:  # noqa: BLE001 — an operation without a meta kernel: the caller falls back
        return None
    finally:
        for h in handles:
            h.remove()
    producers = [n for n, out in fired if out is feats]  # innermost first: a hook fires as its module ends
    stages = [n for n in producers if n in _feature_modules(model)]
    return stages[-1] if stages else (producers[-1] if producers else None)


def _call_features(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    """``model.forward_features(x)`` with the meta stand-ins ``state`` of its parameters and buffers."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(model, state, tie_weights=False, strict=False):
        return model.forward_features(x)


def timm_default_layer(model: nn.Module) -> str:
    """The layer explained by default for a timm model (see the module's docstring for the rule)."""
    kind = timm_kind(model)
    if kind == "tokens":
        stages = _feature_modules(model)
        if not stages:
            raise InvalidInputError("model", f"{type(model).__name__} lists no feature_info",
                                    "a timm model with feature_info, or layer=<name>")
        block = model.get_submodule(stages[-1])
        norm = next((n for n, m in block.named_modules() if n and _is_norm(m)), None)
        return f"{stages[-1]}.{norm}" if norm else stages[-1]
    found = _features_producer(model)
    if found is None:
        stages = _feature_modules(model)
        if not stages:
            raise InvalidInputError("model", f"the default layer of {type(model).__name__} could not be found",
                                    "layer=<name> (one of model.named_modules())")
        return stages[-1]
    return found


def _grid(model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """The patch grid ``(h, w)`` of an ``hw`` image: ``patch_embed``'s own rule when it has one."""
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size") and getattr(pe, "dynamic_img_pad", False):
        return tuple(int(v) for v in pe.dynamic_feat_size(hw))
    ph, pw = (pe.patch_size, pe.patch_size) if isinstance(pe.patch_size, int) else tuple(pe.patch_size)
    return hw[0] // ph, hw[1] // pw


def tokens_to_map(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[N, P + h·w, C]`` → ``[N, C, h, w]``: the model's ``P`` prefix tokens dropped, the patches on the
    grid of the image it last saw (4-D outputs pass through)."""
    prefix = int(model.num_prefix_tokens)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 3:
            return t
        n, tokens, c = t.shape
        hw = getattr(model, "_unioncam_hw", None) or _probe_size(model)
        gh, gw = _grid(model, tuple(hw))
        if tokens - prefix != gh * gw:
            side = math.isqrt(max(tokens - prefix, 0))
            if side * side != tokens - prefix:
                raise InvalidInputError("layer", f"outputs {tokens} tokens", f"{prefix} prefix tokens + a "
                                        f"{gh}×{gw} grid of patches (a layer of the patch tokens)")
            gh = gw = side
        return t[:, prefix:].reshape(n, gh, gw, c).permute(0, 3, 1, 2)

    reshape.__qualname__ = reshape.__name__ = f"tokens_to_map[{prefix} prefix]"
    return reshape


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def _layer_reshape(model: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    kind = timm_kind(model)
    if kind == "tokens":
        return tokens_to_map(model)
    if kind == "nhwc":
        mod = model.get_submodule(name)
        # convolutions (the patch embedding's, downsampling) are NCHW even in a channels-last model
        return None if isinstance(mod, nn.Conv2d) else _nhwc
    return None


def reshape_label(model: nn.Module, name: str) -> str:
    """The reshape of layer ``name`` in words (the documentation's table)."""
    kind = timm_kind(model)
    if kind == "tokens":
        prefix = int(model.num_prefix_tokens)
        return f"tokens → map: {prefix} prefix token{'s' if prefix != 1 else ''} dropped, patches on their grid"
    if _layer_reshape(model, name) is not None:
        return "[N, h, w, C] → [N, C, h, w]"
    return "none (already [N, C, h, w])"


def layer_candidates(model: nn.Module) -> list[str]:
    """Layers worth explaining, for error messages: ``feature_info``'s stages and the default layer."""
    out = _feature_modules(model)
    default = getattr(model, "default_layer", None)
    if default and default not in out:
        out.append(default)
    return out


# ------------------------------------------------------------------------------------- the wrapper

_PIXEL_CLASSES: dict[type, type] = {}


def _record_size(model: nn.Module, x: torch.Tensor) -> None:
    model._unioncam_hw = (int(x.shape[-2]), int(x.shape[-1]))  # token maps use the image's patch grid


def _pixel_class(cls: type) -> type:
    if getattr(cls, "_unioncam_pixel", False):
        return cls
    if cls not in _PIXEL_CLASSES:
        _PIXEL_CLASSES[cls] = pixel_subclass(
            cls, f"PixelTimm{cls.__name__}", globals(), layer_reshape=_layer_reshape, on_input=_record_size,
            doc=f"timm's {cls.__name__} whose first operation is its weights' normalisation (``pretrained_cfg``'s "
                "mean/std; pixel input [N, 3, H, W] in [0, 1]).")
    return _PIXEL_CLASSES[cls]


def _categories(timm, model: nn.Module, classes: int) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        names = ImageNetInfo(subset).label_descriptions(detailed=False)
        names = [n.split(",")[0].strip() for n in names]
        return names if len(names) == classes else None
    except Exception:  # noqa: BLE001 — class names are a nicety: indices stand in
        return None


def _wrap(timm, model: nn.Module, name: str) -> nn.Module:
    cfg = dict(model.pretrained_cfg or {})
    model.__class__ = _pixel_class(type(model))
    dev = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    for key, default in (("mean", (0.485, 0.456, 0.406)), ("std", (0.229, 0.224, 0.225))):
        value = tuple(cfg.get(key) or default)
        model.register_buffer(key, torch.tensor(value, dtype=torch.float32, device=dev).view(1, 3, 1, 1),
                              persistent=False)
    model.interpolation = str(cfg.get("interpolation") or "bilinear")
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "strict_img_size", False) and not getattr(pe, "dynamic_img_size", False) \
            and getattr(pe, "img_size", None) is not None:
        model.input_size = tuple(int(v) for v in pe.img_size)  # its position table fixes the size
    model.timm_name = name
    model.default_layer = timm_default_layer(model)
    model.layer_candidates = layer_candidates(model)
    classes = int(getattr(model, "num_classes", 0) or 0)
    cats = _categories(timm, model, classes) if classes else None
    model.categories = cats or [str(i) for i in range(classes)]
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------- loading


def timm_cache_file(name: str) -> Path:
    """Where a timm model's pretrained weights may be put by hand for an offline machine:
    ``$TORCH_HOME/hub/checkpoints/timm/<name>.safetensors`` (read before any download is tried)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / "timm" / f"{_bare(name)}.safetensors"


def _offline_help(name: str, cfg: dict, cache: Path) -> str:
    hub = cfg.get("hf_hub_id")
    url = f"https://huggingface.co/{hub}/resolve/main/model.safetensors" if hub else cfg.get("url") or "?"
    return (f"Could not get timm's pretrained weights for {name} ({url}). This machine may be offline. "
            f"Either download that file elsewhere and put it at {cache} (set TORCH_HOME to move it), or "
            f"pass its path: load_model({name!r}, '/path/to/{Path(str(url)).name}') / --weights PATH. "
            "For tests and demos without a download use weights='random'.")


def _surely_offline(cfg: dict) -> bool:
    """Whether timm's download would surely fail: the weights are on the Hugging Face hub, not in its cache,
    and the hub's host name does not resolve (with no proxy set, which would resolve it instead). Spares
    an offline user the hub's retries (about 45 s) before the same error."""
    hub = cfg.get("hf_hub_id")
    if not hub or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                                    "ALL_PROXY", "all_proxy")):
        return False
    try:
        from urllib.parse import urlparse

        from huggingface_hub import constants, try_to_load_from_cache

        for name in ("model.safetensors", "pytorch_model.bin", cfg.get("hf_hub_filename")):
            if name and isinstance(try_to_load_from_cache(hub, name), str):
                return False
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:  # noqa: BLE001 — anything unexpected: let timm try
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def _create(timm, bare: str, **kw) -> nn.Module:
    """``timm.create_model`` with a position table that follows the image size where the model offers one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(bare, dynamic_img_size=True, **kw)
        except TypeError:  # a model without a patch embedding (or a fixed one): no such argument
            return timm.create_model(bare, **kw)


def _read_weights(path: str | os.PathLike, accepted: str) -> tuple[dict, Path]:
    """A torch checkpoint's or a safetensors file's state dict (timm's hub files are the latter)."""
    try:
        return read_state_dict(path, accepted)
    except ValueError as exc:
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), Path(path)
        except Exception:  # noqa: BLE001 — neither format: the torch reader's message says what was wrong
            raise exc from None


def _head_classes(model: nn.Module, state: dict) -> int | None:
    heads = (model.pretrained_cfg or {}).get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        w = state.get(f"{head}.weight")
        if isinstance(w, torch.Tensor):
            return int(w.shape[0])
    return None


def load_timm(name: str, weights: str | os.PathLike = "imagenet", seed: int = 0,
              device: str | torch.device | None = None, **kwargs) -> nn.Module:
    """``timm/<name>`` (or the bare timm name), pixel-space, eval mode, frozen, with its default layer.

    Args:
        name: ``timm/<name>`` with a name from ``timm.list_models()`` (a ``.tag`` suffix picks the
            pretrained tag, as in timm).
        weights: ``"imagenet"`` or ``"pretrained"`` (timm's pretrained weights: the file at
            :func:`timm_cache_file` if present, else timm's own cache or a download), ``"random"`` (timm's
            initialisation seeded by ``seed``; the caller's RNG is untouched) or the path of a state dict
            (``.pth``/``.pt``/``.bin`` or ``.safetensors``) for that architecture (any class count).
        seed: seed for ``"random"``.
        device: where to put it (default CPU).
        kwargs: passed to ``timm.create_model`` (e.g. ``img_size=64`` for a Swin or BEiT, whose size is fixed).

    The normalisation, input size and interpolation are those of the model's ``pretrained_cfg``.
    Token models take any image size that is a multiple of their patch where timm allows it
    (``dynamic_img_size``); others with a fixed size carry ``input_size``.

    Raises:
        RuntimeError: timm is not installed (naming the extra), or pretrained weights neither cached nor
            downloadable (the message says where to put the file).
        InvalidInputError: an unknown name.
        FileNotFoundError / ValueError: a path that does not exist or is not a state dict of ``name``.
    """
    timm = require_timm()
    bare = _check_name(timm, name)
    full = PREFIX + bare
    weights = "imagenet" if weights is None else weights
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(timm, bare, pretrained=False, **kwargs)
            _unzero_head(model)  # a zero head gives blank maps (timm's "jax" initialisations)
    elif isinstance(weights, str) and weights in ("imagenet", "pretrained"):
        cache = timm_cache_file(bare)
        cfg = timm.models.get_pretrained_cfg(bare)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        if cache.is_file():
            kwargs = {**kwargs, "pretrained_cfg_overlay": {"file": str(cache)}}
        elif _surely_offline(cfg):
            raise RuntimeError(_offline_help(full, cfg, cache))
        try:
            model = _create(timm, bare, pretrained=True, **kwargs)
        except Exception as exc:  # network, hub and file errors all mean "not available"
            if isinstance(exc, InvalidInputError):
                raise
            raise RuntimeError(_offline_help(full, cfg, cache)) from exc
    else:
        accepted = "'imagenet' (or 'pretrained'), 'random'"
        state, path = _read_weights(weights, accepted)
        with torch.random.fork_rng(devices=[]):
            probe = _create(timm, bare, pretrained=False, **kwargs)
            classes = _head_classes(probe, state)
            model = probe if classes in (None, probe.num_classes) else \
                _create(timm, bare, pretrained=False, num_classes=classes, **kwargs)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"weights: {path} is not a timm {bare} state dict: {str(exc)[:400]}") from exc
    _wrap(timm, model, full)
    if device is not None:
        model.to(device)
    return model


def families_table() -> str:
    """The documentation's table (``docs/models.md``): each family of :data:`TIMM_FAMILIES` → the model
    it was computed on, its default layer and reshape; built on the ``meta`` device (no weights)."""
    from .cost import meta_model

    rows = ["| family | computed on | kind | default layer | reshape |", "|---|---|---|---|---|"]
    for family, bare in TIMM_FAMILIES:
        model = meta_model(PREFIX + bare)
        layer = model.default_layer
        rows.append(f"| {family} | `timm/{bare}` | {timm_kind(model)} | `{layer}` | {reshape_label(model, layer)} |")
    return "\n".join(rows) + "\n"
