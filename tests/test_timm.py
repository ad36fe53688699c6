"""timm models by name, ``timm/<name>``: families, default layers, reshapes, weights, the oracle, pytorch-grad-cam,
the documentation's table and a served archive.

Seeded random weights only, at small sizes: tiny members of each family (timm's own ``test_*`` models, or a
real family's class built shallow and narrow through ``timm.create_model``'s arguments), so that every method,
the masked ones included, runs on each in about a second.
"""

from __future__ import annotations

import base64
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import unioncam
from unioncam import InvalidInputError
from unioncam.models import load_model
from unioncam.models.timm_zoo import families_table, load_timm, timm_cache_file, timm_kind
from unioncam.reference import unioncam_reference

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parent.parent

#: name → (create_model arguments that make it small, kind, default layer, prefix tokens or None).
FAMILIES = {
    "test_resnet": ({}, "cnn", "layer4", None),
    "regnetx_002": ({}, "cnn", "s4", None),
    "test_efficientnet": ({}, "cnn", "bn2", None),
    "mobilenetv3_small_050": ({}, "cnn", "blocks.5", None),
    "test_convnext": ({}, "cnn", "stages.3", None),
    "densenet121": ({"growth_rate": 8, "block_config": (2, 2, 2, 2)}, "cnn", "features.norm5", None),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1), "embed_dim": 16,
                                      "num_heads": (1, 1, 2, 2)}, "nhwc", "norm", None),
    "test_mambaout": ({}, "nhwc", "stages.3", None),
    "test_vit": ({}, "tokens", "blocks.5.norm1", 1),
    "vit_small_patch14_reg4_dinov2": ({"depth": 2, "embed_dim": 64, "num_heads": 2}, "tokens", "blocks.1.norm1", 5),
    "deit_tiny_distilled_patch16_224": ({"depth": 2, "embed_dim": 64, "num_heads": 2}, "tokens", "blocks.1.norm1", 2),
    "eva02_tiny_patch14_224": ({"depth": 2, "embed_dim": 64, "num_heads": 2}, "tokens", "blocks.1.norm1", 1),
    "beit_base_patch16_224": ({"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64}, "tokens",
                              "blocks.1.norm1", 1),
}


def small(name: str, seed: int = 0, **extra) -> nn.Module:
    """``timm/<name>`` with seeded random weights, made small, 10 classes with a decisive head."""
    kw = {**FAMILIES[name][0], "num_classes": 10, **extra}
    model = load_timm(f"timm/{name}", "random", seed=seed, **kw)
    head = model.get_classifier()
    head = head if isinstance(head, nn.Linear) else next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=0.5)  # as tests/test_models.py: random heads give near-uniform softmax
    return model


def _size(model: nn.Module) -> tuple[int, int]:
    """A non-square size the model takes: 4×3 patches for token models, 64×64 for the others (a fixed-size
    model's own)."""
    fixed = getattr(model, "input_size", None)
    if fixed is not None:
        return tuple(fixed)
    if timm_kind(model) == "tokens":
        p = model.patch_embed.patch_size[0]
        return (4 * p, 3 * p)
    return (64, 64)  # a 2×2 map at a stride of 32


def _image(size, seed=0):
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))


def _plant(model: nn.Module, img: torch.Tensor, c: int = 3) -> int:
    """Give class ``c`` evidence in ``img``: its head row(s) see ``img``'s pre-logit features (logit 6) and
    not those of the baselines the methods compare against (logit 0): a black image (UnionCAM, Score-CAM)
    and the blurred image (Group-CAM). Random weights alone often score a baseline higher than ``img`` for
    every class; then UnionCAM's β ≤ 0 for every map and its answer is rightly all zero, and so on: a test
    of "non-constant maps" needs a class the image is evidence for, as a trained model has."""
    from torchvision.transforms.functional import gaussian_blur

    from unioncam.methods.groupcam import GROUPCAM_BLUR

    k = min(GROUPCAM_BLUR[0], 2 * min(img.shape[-2:]) - 1)
    blurred = gaussian_blur(img[None], [k, k], [GROUPCAM_BLUR[1]] * 2)[0]
    heads = model.get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)  # DeiT: head and head_dist
    feats: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(heads))}
    hooks = [h.register_forward_pre_hook(lambda _m, a, i=i: feats[i].append(a[0].detach()))
             for i, h in enumerate(heads)]
    with torch.no_grad():
        model(torch.stack([img, torch.zeros_like(img), blurred]))
        for i, head in enumerate(heads):
            f, base = feats[i][0][0].double(), feats[i][0][1:].double().T  # [C], [C, 2]
            u = f - base @ torch.linalg.lstsq(base, f[:, None]).solution[:, 0]  # ⊥ both baselines
            head.weight[c] = (6 * u / u.square().sum()).float()
            if head.bias is not None:
                head.bias[c] = 0.0
    for h in hooks:
        h.remove()
    return c


# ---------------------------------------------------------------------------------- every family


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_method_on_each_family(name):
    _, kind, layer, prefix = FAMILIES[name]
    m = small(name)
    assert (timm_kind(m), m.default_layer) == (kind, layer)
    size = _size(m)
    img = _image(size)
    target = _plant(m, img)
    for method in unioncam.METHODS:
        res = unioncam.explain(m, img, method=method, target=target)
        s = res.saliency
        assert s.shape == size and bool(torch.isfinite(s).all()), (name, method)
        assert float(s.max()) > float(s.min()), f"{name} {method}: a constant map"
        assert res.details["layer"] == layer


def test_token_reshape_drops_every_prefix_token_on_a_non_square_grid():
    for name in ("test_vit", "vit_small_patch14_reg4_dinov2", "deit_tiny_distilled_patch16_224"):
        m = small(name)
        prefix = FAMILIES[name][3]
        assert m.num_prefix_tokens == prefix  # class (+ distillation, + 4 registers)
        p = m.patch_embed.patch_size[0]
        for hw in ((5 * p, 3 * p), (2 * p, 7 * p)):  # neither square nor the default size
            seen = {}
            h = m.get_submodule(m.default_layer).register_forward_hook(lambda _m, _i, o: seen.setdefault("o", o))
            with torch.no_grad():
                m(_image(hw)[None])
            h.remove()
            tokens = seen["o"]
            out = m.layer_reshape(m.default_layer)(tokens)
            gh, gw = hw[0] // p, hw[1] // p
            assert out.shape == (1, tokens.shape[-1], gh, gw)
            # patch (i, j) is token prefix + i·gw + j
            assert torch.equal(out[0, :, 1, 2], tokens[0, prefix + 1 * gw + 2])


def test_swin_stages_are_channels_last_and_permuted():
    m = small("swin_tiny_patch4_window7_224")
    seen = {}
    h = m.norm.register_forward_hook(lambda _m, _i, o: seen.setdefault("o", o))
    with torch.no_grad():
        m(_image((64, 64))[None])
    h.remove()
    out = m.layer_reshape("norm")(seen["o"])
    assert seen["o"].shape == (1, 2, 2, 128) and out.shape == (1, 128, 2, 2)
    assert torch.equal(out[0, :, 1, 0], seen["o"][0, 1, 0])
    assert m.layer_reshape("patch_embed.proj") is None  # a convolution: NCHW even here


def test_layer_override_and_a_wrong_name_lists_the_candidates():
    m = small("test_vit")
    img = _image((64, 48))
    res = unioncam.explain(m, img, method="gradcam", layer="blocks.3.norm1")
    assert res.details["layer"] == "blocks.3.norm1" and res.saliency.shape == (64, 48)
    with pytest.raises(InvalidInputError) as err:
        unioncam.explain(m, img, method="gradcam", layer="blocks.99")
    assert "blocks.5" in str(err.value) and "blocks.5.norm1" in str(err.value)


def test_normalisation_and_interpolation_come_from_pretrained_cfg():
    m = load_model("timm/test_vit", "random")
    cfg = m.pretrained_cfg
    assert torch.allclose(m.mean.flatten(), torch.tensor(cfg["mean"])) and \
        torch.allclose(m.std.flatten(), torch.tensor(cfg["std"]))
    assert m.interpolation == cfg["interpolation"]
    x = _image((64, 64))[None]
    with torch.no_grad():
        assert torch.equal(m(x), m.forward_normalized((x - m.mean) / m.std))
    from unioncam.models.cost import default_image_size, default_interpolation

    assert default_image_size("timm/test_vit") == cfg["input_size"][1]
    assert default_interpolation("timm/test_vit") == cfg["interpolation"]
    assert default_interpolation("resnet18") == "bilinear"


# ------------------------------------------------------------------------------------------ weights


def test_random_weights_are_seeded_and_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("timm/test_vit", "random", seed=1)
    after = torch.rand(1)
    b = load_model("timm/test_vit", "random", seed=1)
    c = load_model("timm/test_vit", "random", seed=2)
    assert torch.equal(before, after)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)


def test_a_state_dict_path_torch_or_safetensors_any_class_count(tmp_path):
    from safetensors.torch import save_file

    net = timm.create_model("test_vit", num_classes=7)
    torch.save(net.state_dict(), tmp_path / "mine.pth")
    save_file(net.state_dict(), str(tmp_path / "mine.safetensors"))
    for f in ("mine.pth", "mine.safetensors"):
        m = load_model("timm/test_vit", str(tmp_path / f))
        assert m.num_classes == 7 and m.categories == [str(i) for i in range(7)]
        assert torch.equal(m.head.weight, net.head.weight)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_model("timm/test_vit", str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="'imagenet'"):
        load_model("timm/test_vit", str(tmp_path / "missing.pth"))


def test_pretrained_offline_is_a_sentence_and_the_named_file_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_a, **_k):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError) as err:
        load_model("timm/test_vit")  # pretrained is the default
    msg = str(err.value)
    cache = timm_cache_file("timm/test_vit")
    assert str(tmp_path) in str(cache)
    assert str(cache) in msg and "huggingface.co/timm/test_vit" in msg and "weights='random'" in msg
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # The file put where the message says is what "pretrained" loads, without a network.
    from safetensors.torch import save_file

    net = timm.create_model("test_vit")
    cache.parent.mkdir(parents=True)
    save_file(net.state_dict(), str(cache))
    m = load_model("timm/test_vit", "pretrained")
    assert torch.equal(m.head.weight, net.head.weight)


def test_offline_fails_at_once_when_the_hub_does_not_resolve(monkeypatch, tmp_path):
    import socket

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)

    def no_dns(*_a, **_k):
        raise socket.gaierror(-2, "Name or service not known")

    def never(*_a, **_k):
        raise AssertionError("a download was tried")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", never)
    with pytest.raises(RuntimeError, match="may be offline") as err:
        load_model("timm/resnet10t")
    assert "resnet10t" in str(err.value) and str(tmp_path) in str(err.value)


def test_names_and_a_missing_timm(monkeypatch):
    with pytest.raises(InvalidInputError, match="timm.list_models"):
        load_model("timm/no_such_model_here")
    from unioncam.models import is_known_model

    assert is_known_model("timm/resnet50") and not is_known_model("timm/")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(RuntimeError) as err:
        load_model("timm/resnet50", "random")
    assert "unioncam[timm]" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_unioncam_equals_the_literal_reference_in_strict_fp32(name):
    size = _size(small(name))
    for seed in (1,):  # one image: the reference is one forward per channel
        img = _image(size, seed)
        m = small(name)
        c = _plant(m, img)  # score differences well above float rounding (random heads give ~1e-3)
        fast, ref = unioncam.explain(m, img, target=c, precision="fp32"), unioncam_reference(m, img, target=c)
        assert fast.target == ref.target
        assert fast.details["selected"] == ref.details["selected"]
        assert fast.details["active_channels"] == ref.details["active_channels"]
        assert (fast.saliency - ref.saliency).abs().max() <= 1e-4


def test_vit_gradcam_agrees_with_pytorch_grad_cam():
    """pytorch-grad-cam's documented ViT recipe: target ``blocks[-1].norm1``, its ``reshape_transform``
    dropping the class token onto the patch grid (docs: tutorials/vision_transformers)."""
    gc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m = small("test_vit")  # 160×160 images: a 10×10 grid of 16-pixel patches
    h, w = 160 // 16, 160 // 16

    def reshape_transform(tensor, height=h, width=w):  # verbatim from pytorch-grad-cam's docs
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        result = result.transpose(2, 3).transpose(1, 2)
        return result

    for seed in range(2):
        img = _image((160, 160), seed)
        ours = unioncam.explain(m, img, method="gradcam", precision="fp32")
        with gc.GradCAM(model=m, target_layers=[m.blocks[-1].norm1], reshape_transform=reshape_transform) as cam:
            # the model is frozen: the input carries the gradient pytorch-grad-cam's backward needs
            theirs = cam(input_tensor=img[None].requires_grad_(True), targets=[ClassifierOutputTarget(ours.target)])[0]
        a, b = ours.saliency.flatten().double(), torch.from_numpy(theirs).flatten().double()
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert r >= 0.98, f"Pearson {float(r):.4f}"


# ------------------------------------------------------------------------------------ docs and CLI


def test_the_documentations_table_is_the_codes_own():
    text = (ROOT / "docs" / "models.md").read_text()
    assert families_table() in text, "docs/models.md's timm table is stale: paste unioncam.models.timm_zoo.families_table()"


def test_cli_explains_a_timm_model_by_name(tmp_path, capsys):
    from PIL import Image

    from unioncam.cli import main

    Image.fromarray((_image((50, 70)) * 255).byte().permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    rc = main(["explain", str(tmp_path / "x.png"), "--model", "timm/test_vit", "--weights", "random",
               "--method", "gradcam", "--out", str(tmp_path / "out"), "-q"])
    assert rc == 0
    record = json.loads((tmp_path / "out" / "x.gradcam.json").read_text())
    assert record["model"] == "timm/test_vit" and record["size"] == [160, 160]  # test_vit's own input size
    assert record["details"]["layer"] == "blocks.5.norm1"
    rc = main(["archive", "--model", "timm/no_such_model_here", "--model-store", str(tmp_path / "s")])
    assert rc == 2 and "not a timm model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a real server


@pytest.mark.server
def test_torchserve_serves_a_timm_archive_offline(tmp_path, monkeypatch):
    """The archive holds the name and the weights file: the worker rebuilds the model with no network."""
    requests = pytest.importorskip("requests")
    from unioncam.serve.archive import ArchiveSettings, build_archive
    from unioncam.serve.torchserve.server import Ports, TorchServe, config_text
    from unioncam.serve.viewer import archive_info

    from .fakes import random_png

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the worker inherits it: any download attempt fails at once
    net = load_model("timm/test_vit", "random", seed=4)
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    settings = ArchiveSettings(model="timm/test_vit", weights=str(tmp_path / "vit.pth"), image_size=64, workers=1,
                               batch_size=64, device="cpu")
    mar = build_archive(settings, tmp_path / "store", "vit")
    with zipfile.ZipFile(mar) as z:
        assert "timm-test_vit.pth" in z.namelist()
        assert "model: timm/test_vit" in z.read("model-config.yaml").decode()
    info = archive_info(mar, "vit")
    assert info["architecture"] == "timm/test_vit" and info["model"] == "vit"
    config = tmp_path / "config.properties"
    config.write_text(config_text(Ports.free()))
    ts = TorchServe(model_store=tmp_path / "store", run_dir=tmp_path / "run", models={"vit": mar.name}, config=config)
    ts.start(timeout=240)
    try:
        assert "model timm/test_vit" in (ts.log_dir / "model_log.log").read_text(), ts.log_tail()
        img = random_png(5, 80)
        assert net.interpolation == "bicubic"  # the worker resizes uploads as the model's pretrained_cfg says
        px = unioncam.to_pixels(unioncam.decode_image(img), size=64, interpolation="bicubic")
        r = requests.post(f"{ts.url}/predictions/vit", headers=ts.headers(), data=img, timeout=120)
        assert r.status_code == 200, r.text
        with torch.no_grad():
            top = net(px[None]).softmax(-1)[0].topk(5).indices.tolist()
        assert [p["class"] for p in r.json()["predictions"]] == top
        r = requests.post(f"{ts.url}/explanations/vit", headers=ts.headers(), timeout=240,
                          files={"image": img}, data={"method": "gradcam"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["class"] == top[0] and body["details"]["layer"] == "blocks.5.norm1"
        assert body["map"]["shape"] == [64, 64]
        raw = base64.b64decode(body["map"]["data"])
        served = torch.frombuffer(bytearray(raw), dtype=torch.float16).reshape(64, 64).float()
        assert (served - unioncam.explain(net, px, method="gradcam").saliency).abs().max() < 2e-3
    finally:
        ts.stop()
