"""The handler in-process with a stand-in for TorchServe's context: per-request dispatch and errors."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import unioncam

from .fakes import SIZE, FakeContext

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    from unioncam.serve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    h.initialize(FakeContext(tmp_path_factory.mktemp("model"), []))
    return h


def _png() -> bytes:
    img = Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_one_batch_mixing_kinds_is_answered_per_request(handler, vgg_random):
    good = _png()
    b64 = base64.b64encode(good).decode()
    data = [
        {"body": good},                                                   # prediction
        {"body": {"image": b64, "method": "gradcam", "target": "cat"}},   # explanation, bad target
        {"image": good, "method": b"gradcam", "format": b"json"},          # explanation, multipart form
        {"body": b"\x89PNG\r\n\x1a\n truncated"},                            # prediction, broken image
        {"body": {"instances": [{"image": {"b64": b64}, "method": "xgradcam"}]}},  # KServe v1 explanation
    ]
    ctx = FakeContext(Path("."), [{}, {"explain": "True"}, {"explain": "True"}, {}, {"explain": "True"}])
    out = handler.handle(data, ctx)
    assert len(out) == 5
    assert ctx.status == {1: 400, 3: 400}
    assert out[1]["error"]["field"] == "target" and out[3]["error"]["field"] == "image"
    px = unioncam.to_pixels(unioncam.decode_image(good), size=SIZE)
    with torch.no_grad():
        top = vgg_random(px[None]).softmax(-1)[0].topk(5).indices.tolist()
    assert [p["class"] for p in out[0]["predictions"]] == top
    ref = unioncam.explain(vgg_random, px, method="gradcam")
    got = torch.frombuffer(bytearray(base64.b64decode(out[2]["map"]["data"])), dtype=torch.float16).reshape(SIZE, SIZE)
    assert torch.equal(got, ref.saliency.half())
    assert out[4]["explanations"][0]["method"] == "xgradcam"
    assert ctx.content_type[2] == "application/json"


def test_png_format_returns_bytes(handler):
    ctx = FakeContext(Path("."), [{"explain": "True"}])
    out = handler.handle([{"image": _png(), "method": b"layercam", "format": b"png"}], ctx)
    assert isinstance(out[0], bytes) and out[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert ctx.content_type[0] == "image/png" and ctx.status == {}


@pytest.mark.parametrize("body,field", [
    ({}, "body"),
    ({"body": []}, "body"),
    ({"body": {"img": "x"}}, "image"),
    ({"body": {"image": "x", "colour": 1}}, "options"),
    ({"body": {"instances": []}}, "instances"),
    ({"body": {"inputs": [{"name": "image", "data": "abc"}]}}, "inputs[0].data"),
    ({"body": {"image": 5}}, "image"),
    ({"body": {"image": "aGVsbG8=", "theta": True}}, "theta"),
])
def test_malformed_bodies_name_the_problem(handler, body, field):
    ctx = FakeContext(Path("."), [{"explain": "True"}])
    out = handler.handle([body], ctx)
    assert ctx.status == {0: 400}, out
    assert out[0]["error"]["field"] == field
