"""The handler in-process with a stand-in for TorchServe's context: per-request dispatch and errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

import unioncam

from .fakes import SIZE, FakeContext, random_png

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    h.initialize(FakeContext(tmp_path_factory.mktemp("model"), []))
    return h


def test_one_batch_mixing_kinds_is_answered_per_request(handler, vgg_random):
    good = random_png()
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
    out = handler.handle([{"image": random_png(), "method": b"layercam", "format": b"png"}], ctx)
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


def test_explanations_past_the_slot_limit_get_503_with_retry_after(handler):
    # One slot (the archive's default for 2 workers): while it is held, e.g. by the other worker, a
    # masked-forward explanation is refused at once; predictions and gradient methods are still served.
    ctx = FakeContext(Path("."), [{"explain": "True"}, {"explain": "True"}, {}])
    rows = [{"image": random_png(), "method": b"scorecam"}, {"image": random_png(), "method": b"gradcam"}, {"body": random_png()}]
    with handler.slots.acquire() as held:
        assert held
        out = handler.handle(rows, ctx)
    assert ctx.status == {0: 503}
    assert out[0]["error"]["field"] == "server" and int(ctx.response_headers[0]["Retry-After"]) >= 1
    assert out[1]["method"] == "gradcam" and len(out[2]["predictions"]) == 5
    ctx = FakeContext(Path("."), [{"explain": "True"}])
    out = handler.handle(rows[:1], ctx)  # the slot is free again
    assert ctx.status == {} and out[0]["method"] == "scorecam"


def test_slots_are_shared_across_processes(tmp_path):
    import subprocess
    import sys

    from unioncam.serve.limits import Slots

    key = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from unioncam.serve.limits import Slots\n"
        f"with Slots({key!r}, 1).acquire() as ok:\n"
        "    print(ok, flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with Slots(key, 1).acquire() as ok:
            assert ok is False  # the other process holds the only slot
        with Slots(key, 2).acquire() as ok:
            assert ok is True  # a second slot is free
    finally:
        holder.kill()
        holder.wait()
    with Slots(key, 1).acquire() as ok:
        assert ok is True  # released when its holder died


def test_v2_explains_through_infer_with_parameters_explain(handler):
    b64 = base64.b64encode(random_png()).decode()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}
    ctx = FakeContext(Path("."), [{}, {}, {"explain": "True"}, {}])
    out = handler.handle([
        {"body": {"id": "e", "inputs": [tensor], "parameters": {"explain": True, "method": "gradcam"}}},
        {"body": {"inputs": [tensor], "parameters": {"method": "gradcam"}}},
        {"body": {"inputs": [tensor], "parameters": {"method": "gradcam"}}},
        {"body": {"inputs": [tensor], "parameters": {"explain": "yes"}}},
    ], ctx)
    assert ctx.status == {3: 400} and out[3]["error"]["field"] == "parameters.explain"
    assert out[0]["id"] == "e" and out[0]["outputs"][0]["name"] == "explanations"
    assert out[1]["outputs"][0]["name"] == "predictions"  # no flag: a prediction
    assert out[2]["outputs"][0]["name"] == "explanations"  # TorchServe's own explain route still explains
    maps = [json.loads(out[i]["outputs"][0]["data"][0])["map"] for i in (0, 2)]
    assert maps[0] == maps[1]


def test_one_bad_instance_is_answered_with_its_error_and_the_others_served(handler):
    good = base64.b64encode(random_png()).decode()
    body = {"instances": [{"image": {"b64": good}, "method": "gradcam"}, {"image": {"b64": good}, "target": "cat"},
                          {"image": "not base64 !!"}]}
    ctx = FakeContext(Path("."), [{"explain": "True"}, {"explain": "True"}])
    out = handler.handle([{"body": body}, {"body": {"instances": [body["instances"][0]]}}], ctx)
    assert ctx.status == {}
    first, bad_target, bad_image = out[0]["explanations"]
    assert first["map"] == out[1]["explanations"][0]["map"]
    assert bad_target["code"] == 400 and bad_target["error"]["field"] == "target"
    assert bad_image["code"] == 400 and bad_image["error"]["field"] == "instances[2]"
    # Every instance wrong: the request's answer is the (first) error.
    ctx = FakeContext(Path("."), [{"explain": "True"}])
    out = handler.handle([{"body": {"instances": body["instances"][1:]}}], ctx)
    assert ctx.status == {0: 400} and out[0]["error"]["field"] == "target"
