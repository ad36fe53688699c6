"""torchvision classifiers through ``load_model``: names, weights, default layers, token layers, every method.

Seeded random weights only (no download here). Small inputs: 64×64 for the CNNs, a small ViT and a small Swin
for the masked methods on transformers; torchvision's vit_b_16 runs the gradient methods at 224×224.
"""

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import unioncam
from unioncam import InvalidInputError
from unioncam.models import (
    TORCHVISION_MODELS,
    PixelVGG16,
    default_layer_of,
    load_model,
    pixel_model,
    vit_tokens_to_map,
)
from unioncam.reference import unioncam_reference

#: The families the README lists, with the layer explained by default and its channel count.
LISTED = {
    "resnet18": ("layer4", 512),
    "resnet50": ("layer4", 2048),
    "vgg11": ("features.19", 512),
    "vgg13_bn": ("features.33", 512),
    "vgg19": ("features.35", 512),
    "densenet121": ("features", 1024),
    "efficientnet_b0": ("features.8", 1280),
    "mobilenet_v3_large": ("features.16", 960),
    "convnext_tiny": ("features.7", 768),
    "regnet_y_800mf": ("trunk_output", 784),
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", 768),
    "swin_t": ("features.7.1.norm1", 768),
}
GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam")


def _valid(res, size):
    s = res.saliency
    assert s.shape == size and s.dtype == torch.float32
    assert bool(torch.isfinite(s).all()) and float(s.min()) >= 0.0 and float(s.max()) <= 1.0


def small_vit(seed: int = 0) -> nn.Module:
    """A 2-layer ViT on 32×32 images (4×4 patches of 8 pixels, 32 channels), pixel-space, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                   hidden_dim=32, mlp_dim=64, num_classes=10)
        nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision starts it at zero (blank maps)
    return pixel_model(vit)


def small_swin(seed: int = 0) -> nn.Module:
    """A 2-stage Swin on 32×32 images (8×8 then 4×4 tokens, 16 then 32 channels), pixel-space, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                                  window_size=[2, 2], num_classes=10)
        nn.init.normal_(swin.head.weight, std=0.5)
    return pixel_model(swin)


def _image(size, seed=0):
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- names, layers


def test_every_torchvision_classifier_has_a_default_layer():
    """Built on the meta device (no memory, no init cost): each name's default layer exists."""
    assert {"resnet18", "vit_b_16", "swin_t", "convnext_tiny"} <= set(TORCHVISION_MODELS)
    for name in TORCHVISION_MODELS:
        extra = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
        if name.startswith("regnet"):  # its builder computes widths with tensors: no meta device
            if name not in ("regnet_x_400mf", "regnet_y_800mf"):
                continue  # the same class and the same rule as these two
            m = torchvision.models.get_model(name, weights=None)
        else:
            with torch.device("meta"):
                m = torchvision.models.get_model(name, weights=None, **extra)
        layer = default_layer_of(m)
        assert layer is not None and layer in dict(m.named_modules()), name


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "swin_t", "densenet121"])
def test_default_layer_output_shape(name):
    """At 224² on the meta device: the default layer (reshaped for the transformers) is [N, C, h, w]."""
    layer, channels = LISTED[name]
    with torch.device("meta"):
        m = pixel_model(torchvision.models.get_model(name, weights=None))
    assert m.default_layer == layer
    seen = {}
    module = m.get_submodule(layer)
    h = module.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    try:
        m(torch.zeros(1, 3, 224, 224, device="meta"))
    finally:
        h.remove()
    reshape = m.layer_reshape(layer) or (lambda t: t)
    side = 14 if name == "vit_b_16" else 7  # 16-pixel patches
    assert tuple(reshape(seen["out"]).shape) == (1, channels, side, side)


def test_random_weights_are_seeded_and_leave_the_callers_rng_alone():
    state = torch.get_rng_state()
    a, b, c = load_model("resnet18", "random"), load_model("resnet18", "random"), load_model("resnet18", "random",
                                                                                           seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert a.default_layer == "layer4" and len(a.categories) == 1000 and a.categories[0] == "tench"
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_pixel_input_and_forward_normalized():
    m = load_model("resnet18", "random")
    x = _image((32, 32))[None]
    z = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(m(x), m.forward_normalized(z), atol=1e-5)
        assert torch.allclose(m(x), torchvision.models.ResNet.forward(m, z), atol=1e-5)
    assert set(m.state_dict()) == set(torchvision.models.resnet18().state_dict())  # torchvision's keys


def test_vgg16_and_shapes_keep_their_own_loaders():
    m = load_model("vgg16", "random")
    assert type(m) is PixelVGG16 and m.default_layer == "features.29"
    with torch.device("meta"):
        assert pixel_model(torchvision.models.vgg16_bn()).default_layer == "features.42"
    assert type(load_model("shapes")).__name__ == "ShapesCNN"


def test_unknown_name_and_bad_weights(tmp_path):
    with pytest.raises(InvalidInputError, match="torchvision classifier name"):
        load_model("resnet19", "random")
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V1"):
        load_model("resnet18", "nonsense")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_model("resnet18", str(tmp_path / "junk.pth"))
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision resnet18 state dict"):
        load_model("resnet18", str(tmp_path / "other.pth"))


def test_state_dict_path_any_class_count(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = torchvision.models.resnet18(num_classes=7)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    m = load_model("resnet18", str(tmp_path / "r18.pth"))
    assert m.fc.out_features == 7 and m.categories == [str(i) for i in range(7)]
    assert torch.equal(m.conv1.weight, net.conv1.weight)


def test_imagenet_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_a, **_k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as err:
        load_model("resnet50", "imagenet")
    msg = str(err.value)
    assert "resnet50-" in msg and ".pth" in msg and str(tmp_path) in msg and "weights='random'" in msg
    assert "https://download.pytorch.org/models/" in msg
    with pytest.raises(RuntimeError, match="vit_b_16"):
        load_model("vit_b_16")  # imagenet is the default


# ------------------------------------------------------------------------------ explaining them


@pytest.mark.parametrize("name", [n for n in LISTED if n not in ("vit_b_16",)])
def test_gradient_methods_on_every_listed_family(name):
    m = load_model(name, "random")
    img = _image((64, 64))
    for method in GRADIENT_METHODS:
        res = unioncam.explain(m, img, method=method)
        _valid(res, (64, 64))
        assert res.details["layer"] == LISTED[name][0] and res.details["channels"] == LISTED[name][1]


def test_vit_b_16_at_224_gradient_methods_and_its_size_check():
    m = load_model("vit_b_16", "random")
    img = _image((224, 224))
    results = unioncam.explain_batch(m, [img], method="gradcam")
    _valid(results[0], (224, 224))
    assert results[0].details["channels"] == 768
    assert float(results[0].saliency.max()) == 1.0  # the head is not zero: gradients flow to the patches
    with pytest.raises(InvalidInputError, match="224×224 for this model"):
        unioncam.explain(m, _image((64, 64)), method="gradcam")


@pytest.mark.parametrize("make", [small_vit, small_swin], ids=["vit", "swin"])
def test_every_method_on_small_transformers(make):
    m = make()
    img = _image((32, 32))
    for method in unioncam.METHODS:
        res = unioncam.explain(m, img, method=method)
        _valid(res, (32, 32))
        if method != "groupcam":  # its group scores against a blurred image may all be ≤ 0 here
            assert float(res.saliency.max()) == 1.0, method
        assert res.details["channels"] == 32


def test_resnet18_every_method():
    m = load_model("resnet18", "random")
    img = _image((32, 32))
    for method in unioncam.METHODS:  # layer3 at 32²: 256 channels of 2×2
        _valid(unioncam.explain(m, img, method=method, layer="layer3"), (32, 32))


def _small_families():
    """Narrow members of each family, built from the same torchvision classes (same default-layer rule,
    same wrapper) so that every method, the masked ones included, runs on each in a second or two. The
    real models' layers are 512–2048 channels wide: hundreds of masked forwards each (see the README's
    cost table), too slow for this suite on 2 cores; their gradient methods run above. (VGG: VGG16 in
    test_equivalence.py; ResNet: resnet18 below; ViT and Swin: the small ones below.)"""
    from torchvision.models.convnext import CNBlockConfig
    from torchvision.models.efficientnet import MBConvConfig
    from torchvision.models.mobilenetv3 import InvertedResidualConfig
    from torchvision.models.regnet import BlockParams

    tvm = torchvision.models
    return {
        "densenet": lambda: tvm.DenseNet(growth_rate=8, block_config=(1, 1, 1, 1), num_init_features=8,
                                         num_classes=10),
        "convnext": lambda: tvm.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1),
                                          CNBlockConfig(64, None, 1)], num_classes=10),
        "regnet": lambda: tvm.RegNet(BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8),
                                     num_classes=10),
        "mobilenet_v3": lambda: tvm.MobileNetV3(
            [InvertedResidualConfig(8, 3, 16, 8, True, "RE", 2, 1, 1.0),
             InvertedResidualConfig(8, 3, 24, 16, False, "HS", 2, 1, 1.0),
             InvertedResidualConfig(16, 3, 32, 24, True, "HS", 2, 1, 1.0)], last_channel=64, num_classes=10),
        "efficientnet": lambda: tvm.EfficientNet(
            [MBConvConfig(1, 3, 2, 8, 8, 1, 1.0, 1.0), MBConvConfig(4, 3, 2, 8, 16, 1, 1.0, 1.0),
             MBConvConfig(4, 3, 2, 16, 24, 1, 1.0, 1.0)], dropout=0.0, last_channel=48, num_classes=10),
    }


@pytest.mark.parametrize("family", ["densenet", "convnext", "regnet", "mobilenet_v3", "efficientnet"])
def test_every_method_on_a_narrow_member_of_each_family(family):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = pixel_model(_small_families()[family]())
    assert m.default_layer == default_layer_of(m)
    img = _image((64, 64))
    for method in unioncam.METHODS:
        res = unioncam.explain(m, img, method=method)
        _valid(res, (64, 64))
        if res.details.get("masked_forwards", 0):
            assert res.details["masked_forwards"] > 3, (family, method)


@pytest.mark.slow
def test_masked_methods_at_resnet18s_layer4():
    """The real width: 512 masked forwards at 64² (layer4 is 2×2 there)."""
    m = load_model("resnet18", "random")
    res = unioncam.explain(m, _image((64, 64)), method="unioncam")
    _valid(res, (64, 64))
    assert res.details["active_channels"] > 400


# --------------------------------------------------------------------- token layers and reshape=


class _TokenModel(nn.Module):
    """A user model (not from load_model) whose explained layer outputs ViT tokens: needs reshape=."""

    def __init__(self):
        super().__init__()
        self.vit = small_vit()

    def forward(self, x):
        return self.vit(x)


def test_reshape_argument_for_other_models():
    user = _TokenModel().eval()
    layer = "vit.encoder.layers.encoder_layer_1.ln_1"
    img = _image((32, 32))
    with pytest.raises(InvalidInputError, match="reshape="):
        unioncam.explain(user, img, method="gradcam", layer=layer)
    with pytest.raises(InvalidInputError, match="reshape"):
        unioncam.explain(user, img, method="gradcam", layer=layer, reshape="tokens")
    with pytest.raises(InvalidInputError, match="reshape"):
        unioncam.explain(user, img, method="gradcam", layer=layer, reshape=lambda t: t)  # still 3-D
    for method in ("gradcam", "scorecam"):
        mine = unioncam.explain(user, img, method=method, layer=layer, reshape=vit_tokens_to_map)
        auto = unioncam.explain(user.vit, img, method=method)
        assert torch.allclose(mine.saliency, auto.saliency, atol=1e-6)


# ------------------------------------------------------------------------------ against the oracle


@pytest.mark.parametrize("make", [small_vit, small_swin], ids=["vit", "swin"])
def test_fast_path_matches_reference_on_transformers(make):
    m = make()
    for seed in range(3):
        img = _image((32, 32), seed)
        fast, ref = unioncam.explain(m, img, precision="fp32"), unioncam_reference(m, img)
        assert fast.details["selected"] == ref.details["selected"]
        assert (fast.saliency - ref.saliency).abs().max() <= 1e-4
        assert fast.details["active_channels"] == ref.details["active_channels"]


def test_fast_path_matches_reference_on_resnet18():
    """layer2 at 32²: 128 channels of 4×4 (the reference makes one forward per channel)."""
    m = load_model("resnet18", "random")
    img = _image((32, 32), 1)
    fast = unioncam.explain(m, img, layer="layer2", precision="fp32")
    ref = unioncam_reference(m, img, layer="layer2")
    assert fast.details["selected"] == ref.details["selected"]
    assert (fast.saliency - ref.saliency).abs().max() <= 1e-4
