"""Bad input gets one clear error; model loading; image decoding; the CLI."""

import io
import json
import urllib.error

import pytest
import torch
from PIL import Image

import unioncam
from unioncam import InvalidInputError
from unioncam.cli import main

from .conftest import make_tiny_cnn


@pytest.fixture
def model():
    return make_tiny_cnn()


@pytest.mark.parametrize(
    "image, words",
    [
        (torch.rand(1, 3, 16, 16), "shape (1, 3, 16, 16)"),
        (torch.rand(4, 16, 16), "shape (4, 16, 16)"),
        (torch.rand(3, 16, 16) * 255, "values in"),
        (torch.rand(3, 16, 16) - 0.5, "values in"),
        ((torch.rand(3, 16, 16) * 255).byte(), "dtype torch.uint8"),
        (torch.full((3, 16, 16), float("nan")), "NaN"),
        ("cat.png", "is a str"),
    ],
)
def test_bad_image(model, image, words):
    with pytest.raises(InvalidInputError) as err:
        unioncam.explain(model, image)
    assert err.value.field == "image" and words in str(err.value) and "accepted" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"method": "gradcam-plus"}, "method", "unioncam, gradcam, gradcam++"),
        ({"method": None}, "method", "not a known method"),
        ({"target": 10}, "target", "[0, 9]"),
        ({"target": -1}, "target", "out of range"),
        ({"target": "cat"}, "target", "not a class index"),
        ({"target": True}, "target", "not a class index"),
        ({"theta": 101}, "theta", "outside [0, 100]"),
        ({"theta": -0.5}, "theta", "outside [0, 100]"),
        ({"theta": "x"}, "theta", "not a finite number"),
        ({"theta": float("nan")}, "theta", "not a finite number"),
        ({"layer": "features.29"}, "layer", "not a module"),
        ({"layer": "head"}, "layer", "outputs (1, 10)"),
        ({"batch_size": 0}, "batch_size", "≥ 1"),
    ],
)
def test_bad_arguments(model, kwargs, field, words):
    with pytest.raises(InvalidInputError) as err:
        unioncam.explain(model, torch.rand(3, 16, 16), **kwargs)
    assert err.value.field == field and words in str(err.value)


def test_model_keeps_its_gradient_flags_and_gets_no_gradients(model):
    model.requires_grad_(True)
    unioncam.explain(model, torch.rand(3, 16, 16), method="gradcam")
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_pil_image_and_batch_agree_with_single_calls(model):
    g = torch.Generator().manual_seed(4)
    xs = [torch.rand(3, 16, 16, generator=g), torch.rand(3, 12, 20, generator=g), torch.rand(3, 16, 16, generator=g)]
    pil = Image.fromarray((xs[0] * 255).round().byte().permute(1, 2, 0).numpy())
    from_pil = unioncam.explain(model, pil, method="gradcam")
    as_tensor = unioncam.explain(model, unioncam.to_pixels(pil, size=None), method="gradcam")
    assert torch.equal(from_pil.saliency, as_tensor.saliency)
    batch = unioncam.explain_batch(model, xs, targets=[None, 2, 5], method="scorecam", batch_size=9)
    for x, t, b in zip(xs, [None, 2, 5], batch):
        one = unioncam.explain(model, x, method="scorecam", target=t)
        assert b.target == one.target and (b.saliency - one.saliency).abs().max() <= 1e-5
    with pytest.raises(InvalidInputError, match="targets: has 1 entries for 3 images"):
        unioncam.explain_batch(model, xs, targets=[1])


# ------------------------------------------------------------------------------------ model loading


def test_random_weights_are_seeded(vgg_random):
    again = unioncam.load_vgg16("random", seed=0)
    other = unioncam.load_vgg16("random", seed=1)
    w0 = vgg_random.features[0].weight
    assert torch.equal(w0, again.features[0].weight) and not torch.equal(w0, other.features[0].weight)
    assert not vgg_random.training and not any(p.requires_grad for p in vgg_random.parameters())
    assert vgg_random.default_layer == "features.29" and len(vgg_random.categories) == 1000
    assert vgg_random.categories[281] == "tabby"


def test_pixel_space_input_normalises_first(vgg_random):
    from torchvision.models import vgg16

    plain = vgg16()
    plain.load_state_dict(vgg_random.state_dict())  # torchvision-format keys, no mean/std
    plain.eval()
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(vgg_random(x), plain((x - mean) / std), atol=1e-5)


def test_state_dict_path_round_trip(tmp_path):
    src = unioncam.load_vgg16("random", seed=3)
    path = tmp_path / "vgg16.pth"
    torch.save(src.state_dict(), path)
    loaded = unioncam.load_vgg16(path)
    assert torch.equal(loaded.classifier[6].weight, src.classifier[6].weight)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a readable torch checkpoint"):
        unioncam.load_vgg16(tmp_path / "junk.pth")
    torch.save({"features.0.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        unioncam.load_vgg16(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="neither 'imagenet', 'random' nor an existing file"):
        unioncam.load_vgg16(tmp_path / "missing.pth")


def test_imagenet_weights_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_a, **_k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as err:
        unioncam.load_vgg16("imagenet")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path) in msg and "weights='random'" in msg


# -------------------------------------------------------------------------------------- decoding


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "is empty"),
        (b"hello, not an image", "not an image"),
        (_png(Image.new("RGB", (1, 1))), "1×1 pixels"),
    ],
)
def test_decode_refuses_bad_uploads(data, words):
    with pytest.raises(InvalidInputError, match=words):
        unioncam.decode_image(data)


def test_decode_refuses_truncated_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
    with pytest.raises(InvalidInputError, match="could not be decoded"):
        unioncam.decode_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_decode_refuses_a_decompression_bomb():
    # A 20000×20000 PNG (50 kB on disk): refused from its header, before any pixel is decoded.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    with pytest.raises(InvalidInputError, match="too large|more than the"):
        unioncam.decode_image(buf.getvalue())


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "CMYK", "L", "1"])
def test_decode_converts_any_mode_to_rgb(mode):
    img = Image.new("RGB", (16, 16), (255, 0, 0)).convert(mode) if mode != "I;16" else Image.new("I;16", (16, 16), 300)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = unioncam.decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (16, 16)


def test_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = unioncam.to_pixels(unioncam.decode_image(_png(img)), size=None)
    assert torch.equal(out, torch.ones(3, 8, 8))


# ------------------------------------------------------------------------------------------- CLI


def test_cli_explain_writes_overlay_and_details(tmp_path, capsys):
    rc = main(["explain", "samples/chelsea.png", "--weights", "random", "--image-size", "32", "--method", "gradcam,layercam",
               "--out", str(tmp_path), "-q"])
    assert rc == 0
    for m in ("gradcam", "layercam"):
        png = Image.open(tmp_path / f"chelsea.{m}.png")
        assert png.size == (32, 32) and png.mode == "RGB"
        rec = json.loads((tmp_path / f"chelsea.{m}.json").read_text())
        assert rec["method"] == m and 0 <= rec["target"] < 1000 and rec["details"]["layer"] == "features.29"
        assert rec["class_name"]


def test_cli_errors_name_the_input(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "nope.jpg"), "--weights", "random", "--out", str(tmp_path)]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    assert main(["explain", str(tmp_path / "bad.jpg"), "--weights", "random", "--out", str(tmp_path)]) == 2
    assert "not an image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", "samples/chelsea.png", "--theta", "101"])
    assert "outside [0, 100]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", "samples/chelsea.png", "--method", "nope"])
    assert "accepted" in capsys.readouterr().err
