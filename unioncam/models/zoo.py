"""Every torchvision classifier, taking pixel input ``[N, 3, H, W]`` in ``[0, 1]``, with its CAM layer.

:func:`pixel_model` turns a torchvision classifier *instance* into a pixel-space model in place: its class
becomes a subclass that normalises first (``forward``), keeps the original forward as
``forward_normalized`` (for the fused mask kernels) and carries ``mean``/``std`` buffers (not saved: the
state dict keeps torchvision's keys), ``default_layer``, ``categories`` and, for token models,
``layer_reshape``. :func:`load_torchvision` builds one by torchvision name with ``imagenet``, ``random`` or
a state-dict path as weights.

Token layers. A ViT encoder layer outputs ``[N, 1 + h·w, C]`` (class token first); a Swin block outputs
``[N, h, w, C]``. ``layer_reshape(name)`` gives the function that turns such an output into
``[N, C, h, w]`` (class token dropped), applied alike to the captured activation and to its gradient;
``None`` for a layer whose output is already ``[N, C, h, w]``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import get_model, get_model_weights

from ..errors import InvalidInputError
from .checkpoint import read_state_dict

__all__ = [
    "TORCHVISION_MODELS",
    "default_layer_of",
    "load_torchvision",
    "nhwc_to_nchw",
    "pixel_model",
    "vit_tokens_to_map",
]

#: Every torchvision classification model name (``torchvision.models.list_models`` of the classifiers).
TORCHVISION_MODELS: tuple[str, ...] = tuple(tvm.list_models(module=tvm))


# ------------------------------------------------------------------------------------------ reshapes


def vit_tokens_to_map(t: torch.Tensor) -> torch.Tensor:
    """ViT tokens ``[N, 1 + h·w, C]`` (class token first, a square grid) → ``[N, C, h, w]``; 4-D passes through."""
    if t.dim() != 3:
        return t
    n, tokens, c = t.shape
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise InvalidInputError("layer", f"outputs {tokens} tokens", "1 class token + a square grid of patches")
    return t[:, 1:].reshape(n, side, side, c).permute(0, 3, 1, 2)


def nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    """Swin's channels-last ``[N, h, w, C]`` → ``[N, C, h, w]``."""
    if t.dim() != 4:
        raise InvalidInputError("layer", f"outputs {tuple(t.shape)}", "a Swin layer whose output is [N, h, w, C]")
    return t.permute(0, 3, 1, 2)


#: Swin modules whose output is already ``[N, C, h, w]`` (or not a map); every other one is ``[N, h, w, C]``.
_SWIN_NCHW = {"", "features.0.0", "permute", "avgpool", "flatten", "head"}


# ------------------------------------------------------------------------------------ default layers


def _last_child(seq: nn.Module, prefix: str) -> str:
    return f"{prefix}.{list(seq.named_children())[-1][0]}"


def _last_relu(seq: nn.Module, prefix: str) -> str:
    name = [n for n, m in seq.named_children() if isinstance(m, nn.ReLU)][-1]
    return f"{prefix}.{name}"


def default_layer_of(model: nn.Module) -> str | None:
    """The layer the CAM literature explains for this torchvision family (``None`` if unknown).

    The last convolutional block: VGG/AlexNet the last ReLU of ``features``, ResNet/ResNeXt/Wide-ResNet
    ``layer4``, DenseNet ``features`` (its output is ``norm5``'s), EfficientNet/MobileNet/ConvNeXt/SqueezeNet
    the last block of ``features``, RegNet ``trunk_output``, MNASNet the last of ``layers``, ShuffleNetV2
    ``conv5``, GoogLeNet ``inception5b``, Inception-v3 ``Mixed_7c``, MaxViT the last of ``blocks``; for the
    transformers the last block's first LayerNorm (pytorch-grad-cam's advice): ViT
    ``encoder.layers.encoder_layer_<last>.ln_1``, Swin ``features.<last>.<last>.norm1``; Swin-v2 normalises
    after attention, so there the last block itself, ``features.<last>.<last>``.
    """
    m = model
    if isinstance(m, (tvm.VGG, tvm.AlexNet)):
        return _last_relu(m.features, "features")
    if isinstance(m, tvm.ResNet):
        return "layer4"
    if isinstance(m, tvm.DenseNet):
        return "features"
    if isinstance(m, (tvm.EfficientNet, tvm.MobileNetV2, tvm.MobileNetV3, tvm.ConvNeXt, tvm.SqueezeNet)):
        return _last_child(m.features, "features")
    if isinstance(m, tvm.RegNet):
        return "trunk_output"
    if isinstance(m, tvm.MNASNet):
        return _last_child(m.layers, "layers")
    if isinstance(m, tvm.ShuffleNetV2):
        return "conv5"
    if isinstance(m, tvm.GoogLeNet):
        return "inception5b"
    if isinstance(m, tvm.Inception3):
        return "Mixed_7c"
    if isinstance(m, tvm.MaxVit):
        return _last_child(m.blocks, "blocks")
    if isinstance(m, tvm.VisionTransformer):
        return _last_child(m.encoder.layers, "encoder.layers") + ".ln_1"
    if isinstance(m, tvm.SwinTransformer):
        stage = _last_child(m.features, "features")
        block = _last_child(m.get_submodule(stage), stage)
        v2 = type(m.get_submodule(block)).__name__.endswith("V2")
        return block if v2 else f"{block}.norm1"
    return None


# ------------------------------------------------------------------------------------- the wrapper

_PIXEL_CLASSES: dict[type, type] = {}


def pixel_subclass(cls: type, name: str, owner: dict[str, Any], doc: str,
                   layer_reshape: Callable[[nn.Module, str], Callable[[torch.Tensor], torch.Tensor] | None],
                   on_input: Callable[[nn.Module, torch.Tensor], None] | None = None) -> type:
    """``cls`` with pixel input: ``forward`` normalises with the model's ``mean``/``std`` buffers, then runs
    ``cls.forward`` (``forward_normalized``). The class is named ``name`` and set in ``owner`` (a module's
    globals) so that pickle finds it; ``on_input(model, x)`` sees each pixel batch first."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[0, 1]`` → the normalised input the weights were trained on."""
        return (x - self.mean) / self.std

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of an already normalised input (for fused kernels that normalise themselves)."""
        return cls.forward(self, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if on_input is not None:
            on_input(self, x)
        return cls.forward(self, self.normalize(x))

    def reshape(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """How the output of layer ``layer`` becomes ``[N, C, h, w]`` (``None``: it already is)."""
        return layer_reshape(self, layer)

    new = type(name, (cls,), {
        "__module__": owner["__name__"], "__qualname__": name, "_unioncam_pixel": True, "normalize": normalize,
        "forward_normalized": forward_normalized, "forward": forward, "layer_reshape": reshape, "__doc__": doc,
    })
    owner[name] = new
    return new


def _torchvision_reshape(model: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if isinstance(model, tvm.VisionTransformer):
        return vit_tokens_to_map
    if isinstance(model, tvm.SwinTransformer) and name not in _SWIN_NCHW:
        return nhwc_to_nchw
    return None


def _pixel_class(cls: type) -> type:
    """``cls`` with pixel input: ``forward`` normalises, then runs ``cls.forward`` (``forward_normalized``)."""
    if getattr(cls, "_unioncam_pixel", False):
        return cls
    if cls not in _PIXEL_CLASSES:
        _PIXEL_CLASSES[cls] = pixel_subclass(
            cls, f"Pixel{cls.__name__}", globals(), layer_reshape=_torchvision_reshape,
            doc=f"torchvision's {cls.__name__} whose first operation is the weights' normalisation "
                "(pixel input [N, 3, H, W] in [0, 1]).")
    return _PIXEL_CLASSES[cls]


def pixel_model(model: nn.Module, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                default_layer: str | None = None, categories: list[str] | None = None) -> nn.Module:
    """Make a torchvision classifier take pixels in ``[0, 1]``, in place; returns it (eval mode, frozen).

    ``mean``/``std``: the normalisation its weights were trained with (ImageNet's by default).
    ``default_layer``: ``None`` → :func:`default_layer_of` the family. ``categories``: class names
    (default their indices). Module names and state-dict keys are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError("model", f"is a {type(model).__name__}", "a torch.nn.Module")
    model.__class__ = _pixel_class(type(model))
    dev = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    model.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1),
                          persistent=False)
    model.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1),
                          persistent=False)
    layer = default_layer or default_layer_of(model)
    if layer is not None:
        model.default_layer = layer
    head = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    classes = head.out_features if head is not None else None
    if categories is None and classes is not None:
        categories = [str(i) for i in range(classes)]
    if categories is not None:
        model.categories = list(categories)
    if isinstance(model, tvm.VisionTransformer):
        model.input_size = (model.image_size, model.image_size)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------- loading


def _weights_enum(name: str):
    try:
        return get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise InvalidInputError("model", f"{name!r} has no torchvision weights ({exc})",
                                "a torchvision classifier name") from exc


def _offline_help(name: str, w) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    return (
        f"Could not get torchvision's ImageNet weights for {name} ({w}, {w.url}). "
        "This machine may be offline. Either download that file elsewhere and put it at "
        f"{cache} (the torch hub cache; set TORCH_HOME to move it), or pass its path: "
        f"load_model({name!r}, '/path/to/{os.path.basename(w.url)}') / --weights PATH. "
        "For tests and demos without a download use weights='random'."
    )


def _builder_kwargs(name: str, pretrained: bool) -> dict:
    """Constructor arguments torchvision's builder would set for its pretrained weights."""
    if name in ("googlenet", "inception_v3"):
        # torchvision's ImageNet checkpoints of these carry the auxiliary heads and expect transform_input.
        return {"aux_logits": True, "init_weights": not pretrained, "transform_input": pretrained}
    return {}


def _unzero_head(model: nn.Module) -> None:
    """torchvision starts ViT's head at zero: every logit 0, every gradient 0, every map blank. For
    ``"random"`` weights such a head gets a (seeded) normal initialisation of standard deviation 0.02."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and not mod.weight.is_meta and not bool(mod.weight.any()):
            nn.init.trunc_normal_(mod.weight, std=0.02)


def _state_classes(state: dict) -> int:
    """The class count of a torchvision state dict: its last non-auxiliary classifier weight's rows."""
    for key in reversed(list(state)):
        t = state[key]
        if (key.endswith(".weight") and "aux" not in key.lower() and isinstance(t, torch.Tensor)
                and (t.dim() == 2 or (t.dim() == 4 and key.startswith("classifier")))):
            return int(t.shape[0])  # squeezenet's head is a 1×1 convolution
    return 1000


def _head_key(model: nn.Module) -> str | None:
    for mname, mod in reversed(list(model.named_modules())):
        if isinstance(mod, nn.Linear) and mname and "aux" not in mname.lower():
            return f"{mname}.weight"
    return None


def load_torchvision(name: str, weights: str | os.PathLike = "imagenet", seed: int = 0,
                     device: str | torch.device | None = None) -> nn.Module:
    """A torchvision classifier by name, pixel-space (see :func:`pixel_model`), eval mode, frozen.

    Args:
        name: a torchvision classification model name (:data:`TORCHVISION_MODELS`).
        weights: ``"imagenet"`` (torchvision's default weights for it: the torch hub cache under
            ``$TORCH_HOME``, else downloaded), a weights name of that model (e.g. ``"IMAGENET1K_V2"``),
            ``"random"`` (torchvision's initialisation seeded by ``seed``; the caller's RNG is untouched)
            or the path of a state dict for that architecture (any class count).
        seed: seed for ``"random"``.
        device: where to put it (default CPU).

    The normalisation (``mean``/``std``) and ``categories`` are those of the chosen (or, for
    ``random``/a path, the default) weights.

    Raises:
        InvalidInputError: an unknown name.
        RuntimeError: ImageNet weights neither cached nor downloadable (the message says where to put them).
        FileNotFoundError / ValueError: a path that does not exist or is not a state dict of ``name``.
    """
    if name not in TORCHVISION_MODELS:
        raise InvalidInputError("model", f"{name!r} is not a torchvision classifier",
                                "a name from torchvision.models.list_models(module=torchvision.models), "
                                "vgg16, shapes or package.module:factory")
    enum = _weights_enum(name)
    w = enum.DEFAULT
    state = None
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet/inception's note on their init scheme
            torch.manual_seed(seed)
            model = get_model(name, weights=None, **_builder_kwargs(name, False))
            _unzero_head(model)
    elif isinstance(weights, str) and (weights == "imagenet" or weights in enum.__members__):
        w = w if weights == "imagenet" else enum[weights]
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # URLError, socket errors, partial downloads: all mean "not available"
            raise RuntimeError(_offline_help(name, w)) from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_model(name, weights=None, num_classes=len(w.meta["categories"]),
                              **_builder_kwargs(name, True))
        model.load_state_dict(state)
    else:
        state, path = read_state_dict(
            weights, f"'imagenet', 'random', a weights name of {name} ({', '.join(enum.__members__)})")
        num_classes = _state_classes(state)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_model(name, weights=None, num_classes=num_classes, **_builder_kwargs(name, True))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"weights: {path} is not a torchvision {name} state dict: {exc}") from exc
    tf = w.transforms()
    classes = _head_key(model)
    n = model.get_submodule(classes.rsplit(".", 1)[0]).out_features if classes else 1000
    cats = list(w.meta["categories"]) if n == len(w.meta["categories"]) else None
    pixel_model(model, mean=tuple(tf.mean), std=tuple(tf.std), categories=cats)
    if device is not None:
        model.to(device)
    return model
