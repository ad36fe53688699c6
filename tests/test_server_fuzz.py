"""Fuzzing the handler in-process: thousands of generated requests, malformed ones mixed with good ones.

Every request gets exactly one answer; each malformed one a 4xx with a JSON error naming a field; no
exception leaves the handler; and the good requests sharing a batch with them are answered exactly as
they would be alone.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from .fakes import FakeContext, random_png

N_REQUESTS = 2400
#: Requests per handler call. Large, so that the VGG16 forwards (0.2 s each at 32² on a CPU, most of this
#: test's time) stay few; each batch still mixes every kind.
BATCH = 24


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    from unioncam.serve.torchserve.handler import UnionCAMHandler

    h = UnionCAMHandler()
    h.initialize(FakeContext(tmp_path_factory.mktemp("model"), []))
    return h


GOOD = random_png()
B64 = base64.b64encode(GOOD).decode()


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 7, 10**30, 1.5, float("1e308")])
    if kind == 2:
        return rng.choice(["", "x", "top1", "gradcam", "aGVsbG8=", "data:image/png;base64,AAAA", "é" * 3, B64[:50]])
    if kind == 3:
        return rng.choice(["method", "image", "theta", "target", "format", "instances", "inputs", "parameters"])
    if kind in (4, 5):
        keys = ["image", "method", "target", "theta", "format", "instances", "inputs", "parameters", "data", "b64",
                "datatype", "shape", "name", "colour"]
        return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


#: Values each option can never take.
BAD = {
    "image": [None, [], {}, "", "x", 3, 1.5, True, "not base64 !!", B64[: len(B64) // 2], {"b64": 5}],
    "method": ["magiccam", 3, None, [], "", {"a": 1}],
    "target": ["cat", -1, 1000, 1.5, True, [], [1, 1000], [1] * 11, {}, "top0", "top11", "3,cat", "3,"],
    "theta": [101, -1, "hot", None, True, [], {}, float("nan")],
    "format": ["svg", 3, None, "", []],
}


def _mutate(rng: random.Random, body: dict) -> dict:
    """A valid KServe or plain body with one field made wrong."""
    body = json.loads(json.dumps(body))
    bad_values = [None, [], {}, "", "x", 3, -1, 1.5, True, [1, 2], {"a": 1}, "not base64 !!", B64[:-8]]
    if "instances" in body:
        choice = rng.randrange(5)
        if choice == 0:
            body["parameters"] = rng.choice([[1], "gradcam", 3, True])
        elif choice == 1:
            body["instances"] = rng.choice(bad_values + [[{}] * 9])
        elif choice == 2:
            body["instances"][0]["image"] = rng.choice(BAD["image"])
        elif choice == 3:
            key = rng.choice(["method", "target", "theta", "format", "colour"])
            body["instances"][0][key] = rng.choice(BAD[key]) if key in BAD else 1
        else:
            body["inputs"] = []
    elif "inputs" in body:
        choice = rng.randrange(6)
        t = body["inputs"][0]
        if choice == 0:
            body["parameters"] = rng.choice([[1], "gradcam", 3])
        elif choice == 1:
            t["datatype"] = rng.choice(["FP32", "INT8", "bytes", None])
        elif choice == 2:
            t["data"] = rng.choice(bad_values + [[B64] * 9])
        elif choice == 3:
            body["inputs"] = body["inputs"] * rng.choice([2, 50])
        elif choice == 4:
            t["shape"] = rng.choice([[2], [1, 1], "1", 5])
        else:
            t["parameters"] = rng.choice([{"method": "magiccam"}, {"theta": "hot"}, {"target": -3}, "x", [1]])
    else:
        key = rng.choice(["image", "method", "target", "theta", "format", "colour", "instances"])
        body[key] = rng.choice(BAD[key]) if key in BAD else 1
        if key == "instances":
            body["instances"] = [{"image": {"b64": B64}}]  # beside 'image': ambiguous
    return body


def _malformed(rng: random.Random):
    """One malformed request: (row, headers)."""
    kind = rng.randrange(10)
    if kind == 0:  # random bytes, sometimes with a real image's first bytes
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        if rng.random() < 0.3:
            raw = GOOD[: rng.randrange(1, len(GOOD) - 1)]  # truncated PNG
        return {"body": raw} if raw else {}, {}
    if kind == 1:  # deeply nested JSON, as bytes or as text
        depth = rng.choice([2_000, 10_000, 30_000])
        text = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        return {"body": text.encode() if rng.random() < 0.5 else text}, {}
    if kind == 2:  # random JSON, decoded by TorchServe (dict/list) or left as bytes
        doc = _random_json(rng)
        if isinstance(doc, dict) and isinstance(doc.get("image"), str) and doc["image"].startswith(B64[:50]):
            doc["image"] = 5
        if rng.random() < 0.5:
            return {"body": doc}, {}
        return {"body": json.dumps(doc).encode()}, {}
    if kind == 3:  # truncated JSON text
        text = json.dumps({"image": B64, "method": "gradcam"})
        return {"body": text[: rng.randrange(1, len(text) - 1)].encode()}, {}
    if kind == 4:  # multipart with bad or unknown fields
        row = {rng.choice(["image", "file", "colour", "x"]): rng.choice([b"", b"abc", GOOD[:100], "text"])}
        for _ in range(rng.randrange(3)):
            row[rng.choice(["method", "theta", "target", "format", "size"])] = rng.choice(
                [b"magiccam", b"1e9", b"-2", b"svg", b"\xff\xfe", "nan"])
        if "image" not in row and "file" not in row and rng.random() < 0.5:
            row["data"] = b"{"  # JSON that ends at once
        return row, {"explain": rng.choice(["True", None])}
    if kind == 5:  # an urlencoded body: TorchServe passes no fields at all
        return {}, {"Content-Type": "application/x-www-form-urlencoded"}
    if kind == 6:
        return {"body": _mutate(rng, {"instances": [{"image": {"b64": B64}, "method": "gradcam"}]})}, {}
    if kind == 7:
        return {"body": _mutate(rng, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                  "data": [B64]}]})}, {}
    if kind == 8:
        return {"body": _mutate(rng, {"image": B64, "method": "gradcam"})}, {}
    # two images in one request
    return {"image": GOOD, "file": GOOD}, {"explain": "True"}


def _good(rng: random.Random):
    """A good request and what identifies its correct answer."""
    kind = rng.randrange(12)  # mostly predictions (one forward per batch); explanations cost a backward each
    if kind < 4:
        return {"body": GOOD}, {}, "predict"
    if kind < 8:
        return {"body": {"image": B64}}, {}, "predict"
    if kind < 11:
        return {"body": {"instances": [{"image": {"b64": B64}}]}}, {}, "predict-v1"
    return {"image": GOOD, "method": b"gradcam"}, {"explain": "True"}, "gradcam"


@pytest.mark.slow
def test_thousands_of_generated_requests_each_get_their_own_answer(handler):
    rng = random.Random(20261127)
    ctx0 = FakeContext(Path("."), [{}, {"explain": "True"}])
    alone = handler.handle([{"body": GOOD}, {"image": GOOD, "method": b"gradcam"}], ctx0)
    assert ctx0.status == {}
    expected = {"predict": alone[0]["predictions"], "gradcam": alone[1]["map"]["data"]}
    counts = {"malformed": 0, "good": 0}
    explained = 0
    fields: dict[str, int] = {}
    for start in range(0, N_REQUESTS, BATCH):
        rows, headers, want = [], [], []
        for _ in range(BATCH):
            if rng.random() < 0.25:
                row, hdr, kind = _good(rng)
            else:
                (row, hdr), kind = _malformed(rng), None
            rows.append(row)
            headers.append(hdr)
            want.append(kind)
        ctx = FakeContext(Path("."), headers)
        out = handler.handle(rows, ctx)  # must not raise, whatever the batch holds
        assert len(out) == BATCH
        for i, (answer, kind) in enumerate(zip(out, want)):
            if kind is None:
                counts["malformed"] += 1
                assert ctx.status.get(i) == 400, (rows[i] if len(repr(rows[i])) < 300 else repr(rows[i])[:300], answer)
                assert answer["code"] == 400 and answer["error"]["field"] and answer["message"]
                assert ctx.content_type[i] == "application/json"
                fields[answer["error"]["field"]] = fields.get(answer["error"]["field"], 0) + 1
            else:
                counts["good"] += 1
                assert i not in ctx.status, answer
                if kind.startswith("predict"):
                    # Predictions of a batch share one forward: same classes, probabilities to float rounding.
                    got = answer["predictions"][0] if kind == "predict-v1" else answer["predictions"]
                    assert [p["class"] for p in got] == [p["class"] for p in expected["predict"]]
                    assert [p["probability"] for p in got] == pytest.approx(
                        [p["probability"] for p in expected["predict"]], rel=1e-4)
                else:
                    assert answer["map"]["data"] == expected["gradcam"]
                    explained += 1
    assert counts["malformed"] + counts["good"] == N_REQUESTS >= 2000
    assert counts["good"] > 400 and counts["malformed"] > 1500 and explained > 20
    assert {"body", "image", "instances", "inputs", "options"} <= set(fields), fields  # every family was hit


@pytest.mark.parametrize("row,headers,field,words", [
    ({"body": b"[" * 10_000 + b"]" * 10_000}, {}, "body", "nested too deeply"),
    ({"body": "[" * 10_000 + "]" * 10_000}, {}, "body", "nested too deeply"),
    ({"body": b'{"image": "aGVsbG8=", "meth'}, {}, "body", "not valid JSON"),
    ({"body": '{"image": 5}'}, {}, "image", "JSON int"),  # JSON sent as text/plain
    ({}, {"Content-Type": "application/x-www-form-urlencoded"}, "body", "urlencoded"),
    ({"body": {"instances": [{"image": {"b64": B64}}], "parameters": [1]}}, {}, "parameters", "JSON list"),
    ({"body": {"inputs": [{"name": "image", "datatype": "BYTES", "data": [B64]}], "parameters": "x"}}, {},
     "parameters", "JSON str"),
    ({"body": {"inputs": [{"name": "image", "datatype": "FP32", "data": [B64]}]}}, {}, "inputs[0].datatype", "FP32"),
    ({"body": {"inputs": [{"name": "image", "datatype": "BYTES", "data": [B64]}] * 50}}, {}, "inputs", "50 tensors"),
    ({"body": {"image": B64, "instances": [{"image": {"b64": B64}}]}}, {}, "body", "both"),
    ({"image": GOOD, "file": GOOD}, {}, "image", "twice"),
    ({"body": {"instances": [{"image": {"b64": B64}, "colour": 1}]}}, {}, "instances[0]", "unknown key"),
])
def test_ambiguous_or_broken_input_is_refused_with_what_was_wrong(handler, row, headers, field, words):
    ctx = FakeContext(Path("."), [headers, {}])
    out = handler.handle([row, {"body": GOOD}], ctx)
    assert ctx.status == {0: 400}, out[0]
    assert out[0]["error"]["field"] == field and words in out[0]["error"]["problem"], out[0]
    assert len(out[1]["predictions"]) == 5  # the neighbour is served
