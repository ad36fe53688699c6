"""Serving models other than VGG16, and several classes per explanation request.

The handler runs in-process (a stand-in context) on archives' settings for a seeded random ResNet-18 at
64×64; one test starts a real TorchServe on a ResNet-18 archive.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

import unioncam
from unioncam.errors import InvalidInputError
from unioncam.serve import protocol
from unioncam.serve.archive import ArchiveSettings, build_archive
from unioncam.serve.limits import explanation_seconds, masked_forwards, response_timeout

from .fakes import FakeContext, random_png

SIZE = 64
ROOT = Path(__file__).resolve().parent.parent


def _map(body: dict) -> torch.Tensor:
    raw = base64.b64decode(body["map"]["data"])
    return torch.frombuffer(bytearray(raw), dtype=torch.float16).reshape(body["map"]["shape"])


def _context(model_dir: Path, settings: ArchiveSettings, headers: list[dict[str, str]]) -> FakeContext:
    import yaml

    ctx = FakeContext(model_dir, headers)
    ctx.model_yaml_config = yaml.safe_load(settings.yaml())
    return ctx


# ------------------------------------------------------------------------------------- settings


def test_archive_settings_record_the_model_and_its_cost():
    import yaml

    doc = yaml.safe_load(ArchiveSettings(model="resnet50", weights="random", image_size=224).yaml())
    h = doc["handler"]
    assert (h["model"], h["explained_layer"], h["channels"]) == ("resnet50", "layer4", 2048)
    assert h["forward_gflops"] == pytest.approx(8.18, abs=0.05)  # torch's flop counter: 4.1 GMACs
    vgg = yaml.safe_load(ArchiveSettings(weights="random", image_size=224).yaml())
    assert (vgg["handler"]["model"], vgg["handler"]["channels"], vgg["responseTimeout"]) == ("vgg16", 512, 736)
    # 2048 channels at a quarter of VGG16's GFLOPs: the timeout follows the cost, not VGG16's
    assert doc["responseTimeout"] == response_timeout(224, gflops=h["forward_gflops"], channels=2048)
    assert doc["responseTimeout"] != 736
    assert yaml.safe_load(ArchiveSettings(model="vit_b_16", weights="random").yaml())["handler"]["channels"] == 768


@pytest.mark.parametrize("kw, field, words", [
    ({"model": "vit_b_16", "image_size": 64}, "image-size", "224"),
    ({"model": "vgg16", "image_size": 16}, "image-size", "too small"),
    ({"model": "shapes", "weights": "imagenet"}, "weights", "shipped"),
    ({"model": "resnet18", "weights": "shipped"}, "weights", "shapes"),
    ({"model": "tests.models:make_tiny_cnn"}, "model", "could not import"),
    ({"model": "resnet1800"}, "model", "not a known model"),
    ({"model": "resnet18", "layer": "layer9"}, "layer", "layer9"),
])
def test_archive_settings_refuse_what_a_worker_could_not_serve(kw, field, words):
    with pytest.raises(InvalidInputError) as err:
        ArchiveSettings(**{"weights": "random", **kw}).validate()
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_time_estimates_scale_with_the_explained_channels():
    assert masked_forwards("unioncam", 2048) == 2052 and masked_forwards("scorecam", 768) == 769
    assert masked_forwards("gradcam", 2048) == 3
    one = explanation_seconds("unioncam", 224, gflops=8.18, channels=2048)
    assert explanation_seconds("unioncam", 224, gflops=8.18, channels=2048, targets=3) == pytest.approx(3 * one)
    assert explanation_seconds("unioncam", 224, gflops=8.18, channels=512) < one
    # None: VGG16 at that size, as before
    assert explanation_seconds("unioncam", 224) == explanation_seconds("unioncam", 224, gflops=30.94)


# ------------------------------------------------------------------------------------- protocol


D = protocol.Defaults(image_size=SIZE, num_classes=1000)


@pytest.mark.parametrize("value, target, top_k", [
    (None, None, None), ("", None, None), ("top1", None, None), (b"top3", None, 3), ("TOP10", None, 10),
    (281, 281, None), ("281", 281, None), (b"281, 285", [281, 285], None), ([281, 285, 281], [281, 285, 281], None),
    ([7], [7], None),
])
def test_target_forms(value, target, top_k):
    assert protocol._target(value, D) == (target, top_k)


@pytest.mark.parametrize("value, words", [
    ("top0", "top1…top10"), ("top11", "top1…top10"), ("topx", "top1…top10"), ("281,cat", "'cat'"),
    ([1] * 11, "11 classes"), ([], "0 classes"), ("1000", "out of range"), ([3, 1000], "out of range"),
    ([True], "not a class index"), (2.5, "not a class index"),
])
def test_bad_targets_are_named(value, words):
    with pytest.raises(InvalidInputError) as err:
        protocol._target(value, D)
    assert err.value.field == "target" and words in str(err.value)
    assert "topK" in err.value.accepted and "281,285" in err.value.accepted


def test_png_with_several_classes_is_refused():
    with pytest.raises(InvalidInputError) as err:
        protocol.parse({"image": random_png(side=80), "target": b"top3", "format": b"png"}, True, D)
    assert err.value.field == "format"


# ------------------------------------------------------------------------------- handler in-process


@pytest.fixture(scope="module")
def resnet():
    return unioncam.load_model("resnet18", "random", seed=0)


@pytest.fixture(scope="module")
def settings():
    return ArchiveSettings(model="resnet18", weights="random", image_size=SIZE, batch_size=64, workers=1,
                           explain_slots=1)


@pytest.fixture(scope="module")
def handler(tmp_path_factory, settings):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    h.initialize(_context(tmp_path_factory.mktemp("model"), settings, []))
    return h


def test_handler_serves_resnet18_predictions_and_explanations(handler, resnet):
    img = random_png(side=80)
    px = unioncam.to_pixels(unioncam.decode_image(img), size=SIZE)
    b64 = base64.b64encode(img).decode()
    data = [
        {"body": img},
        {"image": img, "method": b"unioncam"},
        {"image": img, "method": b"gradcam", "target": b"top3"},
        {"body": {"image": b64, "method": "layercam", "target": [281, 285]}},
        {"body": {"instances": [{"image": {"b64": b64}, "method": "gradcam", "target": "top2"},
                                {"image": {"b64": b64}, "method": "gradcam", "target": 5}]}},
        {"image": img, "method": b"unioncam", "target": b"top2", "format": b"png"},
    ]
    ctx = FakeContext(Path("."), [{}] + [{"explain": "True"}] * 5)
    out = handler.handle(data, ctx)
    assert ctx.status == {5: 400} and out[5]["error"]["field"] == "format"
    with torch.no_grad():
        probs = resnet(px[None]).softmax(-1)[0]
    assert [p["class"] for p in out[0]["predictions"]] == probs.topk(5).indices.tolist()
    assert out[0]["predictions"][0]["class_name"] == resnet.categories[out[0]["predictions"][0]["class"]]
    ref = unioncam.explain(resnet, px, method="unioncam", batch_size=64)
    assert out[1]["class"] == ref.target and out[1]["details"]["layer"] == "layer4"
    assert out[1]["details"]["channels"] == 512
    assert torch.equal(_map(out[1]), ref.saliency.half())
    top3 = unioncam.explain(resnet, px, method="gradcam", top_k=3)
    assert [b["class"] for b in out[2]["explanations"]] == [r.target for r in top3] == probs.topk(3).indices.tolist()
    for body, r in zip(out[2]["explanations"], top3):
        assert torch.equal(_map(body), r.saliency.half())
        assert body["class_name"] == resnet.categories[r.target]
    pair = unioncam.explain(resnet, px, method="layercam", target=[281, 285])
    assert [b["class"] for b in out[3]["explanations"]] == [281, 285]
    assert all(torch.equal(_map(b), r.saliency.half()) for b, r in zip(out[3]["explanations"], pair))
    v1 = out[4]["explanations"]
    assert isinstance(v1[0], list) and len(v1[0]) == 2 and isinstance(v1[1], dict) and v1[1]["class"] == 5


def test_too_many_masked_explanations_for_the_timeout_are_refused(tmp_path, settings):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    ctx = _context(tmp_path, settings, [])
    ctx.model_yaml_config["responseTimeout"] = 1  # estimates: 0.7 s for one, 2.1 s for three
    h.initialize(ctx)
    ctx = FakeContext(Path("."), [{"explain": "True"}] * 2)
    out = h.handle([{"image": random_png(side=80), "target": b"top3"}, {"image": random_png(side=80), "target": b"top3",
                                                           "method": b"gradcam"}], ctx)
    assert ctx.status == {0: 400}
    assert out[0]["error"]["field"] == "target" and "response timeout (1 s)" in out[0]["message"]
    assert len(out[1]["explanations"]) == 3  # gradient methods are not refused


# ------------------------------------------------------------------------------------- a real server


@pytest.mark.server
def test_torchserve_serves_a_resnet18_archive(tmp_path):
    requests = pytest.importorskip("requests")
    from unioncam.serve.torchserve.server import Ports, TorchServe, config_text

    settings = ArchiveSettings(model="resnet18", weights="random", image_size=SIZE, workers=1, batch_size=64)
    mar = build_archive(settings, tmp_path / "store", "resnet")
    with zipfile.ZipFile(mar) as z:
        names = json.loads(z.read("index_to_name.json"))
        assert "resnet18" in z.read("model-config.yaml").decode()
    model = unioncam.load_model("resnet18", "random", seed=0)
    assert names["281"] == model.categories[281] == "tabby"
    config = tmp_path / "config.properties"
    config.write_text(config_text(Ports.free()))
    ts = TorchServe(model_store=tmp_path / "store", run_dir=tmp_path / "run", models={"resnet": mar.name},
                    config=config)
    ts.start(timeout=240)
    try:
        log = (ts.log_dir / "model_log.log").read_text()
        assert "model resnet18" in log, ts.log_tail()
        img = random_png(5, 80)
        px = unioncam.to_pixels(unioncam.decode_image(img), size=SIZE)
        r = requests.post(f"{ts.url}/predictions/resnet", headers=ts.headers(), data=img, timeout=120)
        assert r.status_code == 200, r.text
        with torch.no_grad():
            top = model(px[None]).softmax(-1)[0].topk(5).indices.tolist()
        assert [p["class"] for p in r.json()["predictions"]] == top
        r = requests.post(f"{ts.url}/explanations/resnet", headers=ts.headers(), timeout=240,
                          files={"image": img}, data={"method": "unioncam", "target": "top2"})
        assert r.status_code == 200, r.text
        bodies = r.json()["explanations"]
        ref = unioncam.explain(model, px, method="unioncam", top_k=2, batch_size=64)
        assert [b["class"] for b in bodies] == [x.target for x in ref] == top[:2]
        for body, x in zip(bodies, ref):
            assert body["details"]["selected"] in ("union", "region")
            # The worker has its own thread count: float sums may round differently, the map stays the same.
            assert (_map(body).float() - x.saliency).abs().max() < 2e-3
    finally:
        ts.stop()


def test_an_archive_of_a_users_state_dict_keeps_its_classes(tmp_path):
    from torchvision.models import resnet18

    with torch.random.fork_rng():
        torch.manual_seed(1)
        state = resnet18(num_classes=10).state_dict()
    path = tmp_path / "mine.pt"
    torch.save(state, path)
    mar = build_archive(ArchiveSettings(model="resnet18", weights=str(path), image_size=SIZE), tmp_path / "s", "mine")
    with zipfile.ZipFile(mar) as z:
        names = json.loads(z.read("index_to_name.json"))
        assert names == {str(i): str(i) for i in range(10)}
        assert torch.equal(torch.load(io.BytesIO(z.read("resnet18.pth")), weights_only=True)["fc.weight"],
                           state["fc.weight"])
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "vgg.pt")
    with pytest.raises(ValueError, match="not a torchvision resnet18 state dict"):
        build_archive(ArchiveSettings(model="resnet18", weights=str(tmp_path / "vgg.pt"), image_size=SIZE),
                      tmp_path / "s", "bad")
    assert not (tmp_path / "s" / "bad.mar").exists()
