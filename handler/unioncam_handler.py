"""TorchServe handler: decode → validate → engine → encode, one answer per request of a batch.

The algorithm lives in the archived ``unioncam`` package; this file only adapts HTTP to it. Every
request of a batch is parsed, validated and answered on its own, so one bad upload gets its own 4xx
(``context.set_response_status(code, phrase, idx)``) while the others of its batch are still served.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

# The archive carries its own copy of the engine next to this file: put it first on sys.path so the
# worker runs the archived engine, not whatever ``unioncam`` an environment happens to have.
_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_HERE, "unioncam")):
    if sys.path[:1] != [_HERE]:
        sys.path.insert(0, _HERE)
    for _name in [m for m in sys.modules if m == "unioncam" or m.startswith("unioncam.")]:
        del sys.modules[_name]

import torch  # noqa: E402

import unioncam  # noqa: E402
from unioncam.engine import black_probs, validate_method, validate_precision, validate_theta  # noqa: E402
from unioncam.errors import InvalidInputError  # noqa: E402

FORMATS = ("json", "png")
OPTIONS = ("method", "target", "theta", "format")
#: The request fields that may carry the image, in the order they are looked for.
IMAGE_FIELDS = ("image", "data", "body", "file")
#: Most instances one KServe request may carry (each is a full explanation).
MAX_INSTANCES = 8


@dataclass
class _Item:
    """One image to answer, with its validated options."""

    pixels: torch.Tensor
    method: str
    target: int | None
    theta: float
    format: str
    decode_ms: float


@dataclass
class _Request:
    kind: str  # "plain" (one answer), "v1" (KServe v1: a list), "v2" (KServe v2 outputs)
    explain: bool
    items: list[_Item] = field(default_factory=list)


def _text(value: Any) -> Any:
    """Multipart form fields arrive as bytes; options are text."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            return value
    return value


def _error_body(code: int, exc: InvalidInputError) -> dict[str, Any]:
    return {"code": code, "error": {"field": exc.field, "problem": exc.problem, "accepted": exc.accepted},
            "message": str(exc)}


class UnionCAMHandler(BaseHandler):
    """Serves ``/predictions`` (top-5 classes) and ``/explanations`` (a saliency map per request)."""

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir")
        cfg = dict((context.model_yaml_config or {}).get("handler", {}) or {})
        self.image_size = int(cfg.get("image_size", 224))
        self.default_method = validate_method(cfg.get("method", "unioncam"))
        self.default_theta = validate_theta(cfg.get("theta", 10.0))
        self.layer = cfg.get("layer") or None
        self.batch_size = int(cfg["batch_size"]) if cfg.get("batch_size") is not None else None
        self.precision = validate_precision(cfg.get("precision", "fp32"))
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu")
        weights_file = os.path.join(model_dir, cfg.get("weights_file", "vgg16.pth"))
        if cfg.get("weights", "file") == "random":
            self.model = unioncam.load_vgg16("random", seed=int(cfg.get("seed", 0)), device=self.device)
            source = f"random (seed {int(cfg.get('seed', 0))})"
        else:
            self.model = unioncam.load_vgg16(weights_file, device=self.device)
            source = weights_file
        names_file = os.path.join(model_dir, "index_to_name.json")
        if os.path.isfile(names_file):
            with open(names_file) as f:
                names = json.load(f)
            self.categories = [names.get(str(i), str(i)) for i in range(len(names))]
        else:
            self.categories = list(self.model.categories)
        self.num_classes = int(self.model.classifier[-1].out_features)
        dtype = next(self.model.parameters()).dtype
        # b = f_c(0) once at start-up: every UnionCAM request then reuses the engine's cached value.
        self.black = black_probs(self.model, (self.image_size, self.image_size), self.device, dtype)
        self.context = context
        self.initialized = True
        logger.info(
            "unioncam handler ready: engine %s from %s, weights %s, image %d, method %s, theta %g, device %s",
            unioncam.__version__, os.path.dirname(unioncam.__file__), source, self.image_size,
            self.default_method, self.default_theta, self.device,
        )

    # ---------------------------------------------------------------------------------------- parsing

    def _image(self, value: Any, name: str) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        if isinstance(value, dict) and "b64" in value:  # KServe v1's binary convention
            value = value["b64"]
        if isinstance(value, str):
            if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,<data>
                value = value.split(",", 1)[1]
            try:  # `base64` without -w0 wraps lines: whitespace is not an error
                value = base64.b64decode("".join(value.split()), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInputError(name, "is text but not valid base64", "an image file, or its bytes in base64")
        elif not isinstance(value, (bytes, bytearray)):
            kind = "null" if value is None else type(value).__name__
            raise InvalidInputError(name, f"is a JSON {kind}", "an image file, or its bytes in base64")
        pil = unioncam.decode_image(value, field=name)
        pixels = unioncam.to_pixels(pil, size=self.image_size)
        return pixels, (time.perf_counter() - start) * 1000

    def _options(self, fields: dict[str, Any]) -> tuple[str, int | None, float, str]:
        method = _text(fields.get("method", self.default_method))
        method = validate_method(method)
        target = _text(fields.get("target"))
        accepted = f"an integer in [0, {self.num_classes - 1}], or omitted / 'top1' for the predicted class"
        if target is None or target == "" or target == "top1":
            target = None
        else:
            if isinstance(target, str):
                try:
                    target = int(target)
                except ValueError:
                    raise InvalidInputError("target", f"{target!r} is not a class index", accepted) from None
            if isinstance(target, bool) or not isinstance(target, int):
                raise InvalidInputError("target", f"{target!r} is not a class index", accepted)
            if not 0 <= target < self.num_classes:
                raise InvalidInputError("target", f"{target} is out of range", accepted)
        theta = _text(fields.get("theta", self.default_theta))
        if isinstance(theta, str):
            try:
                theta = float(theta)
            except ValueError:
                raise InvalidInputError("theta", f"{theta!r} is not a number", "a number in [0, 100]") from None
        theta = validate_theta(theta)
        fmt = _text(fields.get("format", "json"))
        if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
            raise InvalidInputError("format", f"{fmt!r} is not a known format", ", ".join(FORMATS))
        return method, target, theta, fmt.lower()

    def _item(self, image: Any, options: dict[str, Any], name: str) -> _Item:
        method, target, theta, fmt = self._options(options)
        pixels, ms = self._image(image, name)
        return _Item(pixels, method, target, theta, fmt, ms)

    def _parse(self, row: dict[str, Any], explain: bool) -> _Request:
        if not row:
            raise InvalidInputError("body", "is empty", "an image file, a multipart form or a JSON object")
        body = next((row[k] for k in ("body", "data") if k in row), None)
        if isinstance(body, (bytes, bytearray)) and len(row) == 1 and body[:1] in (b"{", b"["):
            try:  # JSON sent without a JSON content type
                body = json.loads(bytes(body).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                pass
        if isinstance(body, list):
            raise InvalidInputError("body", "is a JSON list", "a JSON object with 'image', 'instances' or 'inputs'")
        if isinstance(body, dict) and len(row) == 1:
            return self._parse_json(body, explain)
        # multipart form (one field per option) or a raw image body
        name = next((k for k in IMAGE_FIELDS if k in row), None)
        if name is None:
            raise InvalidInputError(
                "image", f"is missing (form fields: {sorted(row)})", f"a form field named one of {IMAGE_FIELDS}"
            )
        fields = {k: v for k, v in row.items() if k != name}
        unknown = sorted(set(fields) - set(OPTIONS))
        if unknown:
            raise InvalidInputError("options", f"unknown field(s) {unknown}", ", ".join(OPTIONS))
        return _Request("plain", explain, [self._item(row[name], fields, "image")])

    def _parse_json(self, body: dict[str, Any], explain: bool) -> _Request:
        if "instances" in body:  # KServe v1
            inst = body["instances"]
            if not isinstance(inst, list) or not 1 <= len(inst) <= MAX_INSTANCES:
                raise InvalidInputError("instances", "is not a list of 1 to 8 items", "1–8 instances")
            items = []
            for i, x in enumerate(inst):
                if isinstance(x, dict):
                    img_key = next((k for k in ("image", "data", "b64") if k in x), None)
                    image = x if img_key == "b64" else x.get(img_key)
                    opts = {k: v for k, v in x.items() if k != img_key}
                else:
                    image, opts = x, {}
                opts = {**body.get("parameters", {}), **opts}
                items.append(self._item(image, opts, f"instances[{i}]"))
            return _Request("v1", explain, items)
        if "inputs" in body:  # KServe v2 / open inference protocol
            inputs = body["inputs"]
            if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
                raise InvalidInputError("inputs", "is not a list of tensors", "[{'name', 'datatype': 'BYTES', 'data': [base64]}]")
            data = inputs[0].get("data")
            if not isinstance(data, list) or not 1 <= len(data) <= MAX_INSTANCES:
                raise InvalidInputError("inputs[0].data", "is not a list of 1 to 8 images", "base64 strings")
            opts = dict(body.get("parameters") or {})
            opts.update(inputs[0].get("parameters") or {})
            opts = {k: v for k, v in opts.items() if k in OPTIONS}
            return _Request("v2", explain, [self._item(d, opts, f"inputs[0].data[{i}]") for i, d in enumerate(data)])
        if "image" not in body:
            raise InvalidInputError("image", f"is missing (keys: {sorted(body)})", "a JSON object {'image': <base64>, ...}")
        unknown = sorted(set(body) - {"image", *OPTIONS})
        if unknown:
            raise InvalidInputError("options", f"unknown key(s) {unknown}", ", ".join(OPTIONS))
        opts = {k: v for k, v in body.items() if k != "image"}
        return _Request("plain", explain, [self._item(body["image"], opts, "image")])

    # ------------------------------------------------------------------------------------ answering

    def _predict(self, items: list[_Item]) -> list[dict[str, Any]]:
        x = torch.stack([it.pixels for it in items]).to(self.device)
        with torch.no_grad():
            probs = self.model(x).float().softmax(-1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [
            [{"class": c, "class_name": self.categories[c], "probability": p} for c, p in zip(ci, pi)]
            for ci, pi in zip(indices, values)
        ]

    def _explain(self, item: _Item, idx: int) -> dict[str, Any] | bytes:
        start = time.perf_counter()
        # One explanation per call: the map is then the same as unioncam.explain on this image, whatever
        # else shares the batch; masked inputs are already batched inside one explanation.
        res = unioncam.explain(self.model, item.pixels, method=item.method, target=item.target, theta=item.theta,
                               layer=self.layer, batch_size=self.batch_size, precision=self.precision)
        explain_ms = (time.perf_counter() - start) * 1000
        self._metrics(res, explain_ms, idx)
        t0 = time.perf_counter()
        if item.format == "png":
            return unioncam.overlay_png(item.pixels, res.saliency)
        data = base64.b64encode(res.saliency.to(torch.float16).numpy().tobytes()).decode("ascii")
        encode_ms = (time.perf_counter() - t0) * 1000
        return {
            "class": res.target,
            "class_name": self.categories[res.target],
            "score": res.score,
            "method": res.method,
            "map": {"dtype": "float16", "byteorder": sys.byteorder, "shape": list(res.saliency.shape), "data": data},
            "details": res.details,
            "timings": {"decode_ms": item.decode_ms, "explain_ms": explain_ms, "encode_ms": encode_ms},
        }

    def _metrics(self, res: Any, explain_ms: float, idx: int) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        # Fresh dimension lists every call: the metrics API appends to the list it is given.
        metrics.add_time("ExplanationLatency", explain_ms, idx=idx, unit="ms",
                         dimensions=[Dimension("Method", res.method)])
        metrics.add_counter("MaskedForwards", int(res.details.get("masked_forwards", 0)), idx=idx,
                            dimensions=[Dimension("Method", res.method)])
        if res.method == "unioncam":
            pruned = res.details["channels"] - res.details["active_channels"]
            metrics.add_counter("PrunedChannels", int(pruned), idx=idx, dimensions=[Dimension("Method", res.method)])
            metrics.add_counter("SelectedMap", 1, idx=idx, dimensions=[Dimension("Selected", res.details["selected"])])

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """Answer every request of the batch: a dict (JSON), bytes (PNG) or a JSON error with a 4xx."""
        self.context = context
        out: list[Any] = [None] * len(data)
        parsed: dict[int, _Request] = {}
        for idx, row in enumerate(data):
            # Lets a client (and the tests) see which requests shared a handler call.
            context.set_response_header(idx, "X-Batch-Size", str(len(data)))
            # TorchServe marks explanation requests with the header explain=True, per request.
            explain = str(context.get_request_header(idx, "explain")) == "True"
            try:
                parsed[idx] = self._parse(row, explain)
            except InvalidInputError as exc:
                self._fail(context, idx, out, 400, exc)
        # Predictions of the whole batch in one forward.
        pred = [(idx, j, it) for idx, r in parsed.items() if not r.explain for j, it in enumerate(r.items)]
        answers: dict[tuple[int, int], Any] = {}
        if pred:
            try:
                for (idx, j, _), ans in zip(pred, self._predict([it for _, _, it in pred])):
                    answers[(idx, j)] = ans
            except Exception as exc:  # noqa: BLE001 — a failed forward must not lose the explanations
                logger.exception("prediction forward failed")
                for idx in {i for i, _, _ in pred}:
                    self._fail(context, idx, out, 500, InvalidInputError("model", f"prediction failed: {exc}"))
                    parsed.pop(idx, None)
        for idx, req in list(parsed.items()):
            try:
                if req.explain:
                    for j, it in enumerate(req.items):
                        answers[(idx, j)] = self._explain(it, idx)
                out[idx] = self._encode(req, [answers[(idx, j)] for j in range(len(req.items))], context, idx)
            except InvalidInputError as exc:
                self._fail(context, idx, out, 400, exc)
            except Exception as exc:  # noqa: BLE001
                logger.exception("request %d failed", idx)
                self._fail(context, idx, out, 500, InvalidInputError("request", f"failed in the engine: {exc}"))
        return out

    def _encode(self, req: _Request, answers: list[Any], context: Any, idx: int) -> Any:
        if req.kind == "plain":
            ans = answers[0]
            if isinstance(ans, bytes):
                context.set_response_content_type(idx, "image/png")
                return ans
            context.set_response_content_type(idx, "application/json")
            return ans if req.explain else {"predictions": ans}
        answers = [base64.b64encode(a).decode("ascii") if isinstance(a, bytes) else a for a in answers]
        context.set_response_content_type(idx, "application/json")
        if req.kind == "v1":
            return {"explanations" if req.explain else "predictions": answers}
        return {
            "model_name": context.model_name,
            "outputs": [{"name": "explanations" if req.explain else "predictions", "datatype": "BYTES",
                         "shape": [len(answers)], "data": [json.dumps(a) for a in answers]}],
        }

    @staticmethod
    def _fail(context: Any, idx: int, out: list[Any], code: int, exc: InvalidInputError) -> None:
        out[idx] = _error_body(code, exc)
        context.set_response_content_type(idx, "application/json")
        # The reason phrase goes into the HTTP status line: ASCII only; the JSON body has the full message.
        phrase = f"invalid {exc.field}".encode("ascii", "replace").decode("ascii")[:80]
        context.set_response_status(code, phrase, idx)


_service = UnionCAMHandler()


def handle(data: list[dict[str, Any]], context: Any) -> list[Any] | None:
    """TorchServe's module-level entry point."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
