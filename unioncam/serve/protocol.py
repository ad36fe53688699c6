"""The explanations API's wire format, in plain Python: request bodies in, answers out.

TorchServe hands the handler one ``dict`` per request (form fields, or ``body``/``data`` with the raw
bytes or TorchServe's own JSON decode). :func:`parse` turns one into a :class:`Request` — or raises
:class:`~unioncam.InvalidInputError` naming what was wrong — and :func:`encode` turns the answers back
into the response body for the request's kind (plain, KServe v1, KServe v2). Nothing here imports
TorchServe, so every case is testable in-process.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from ..io import decode_image, to_pixels
from ..validation import validate_method, validate_target, validate_theta

__all__ = [
    "FORMATS",
    "IMAGE_FIELDS",
    "MAX_INSTANCES",
    "MAX_TARGETS",
    "OPTIONS",
    "PROGRESS_TYPE",
    "Defaults",
    "Item",
    "Request",
    "encode",
    "error_body",
    "explanation_body",
    "parse",
    "predictions_body",
    "progress_line",
]

FORMATS = ("json", "png")
OPTIONS = ("method", "target", "theta", "format")
#: The request fields that may carry the image, in the order they are looked for.
IMAGE_FIELDS = ("image", "data", "body", "file")
#: Most instances one KServe request may carry (each is a full explanation).
MAX_INSTANCES = 8
#: Most classes one explanation request may ask for (``target=top5``, ``target=281,285``).
MAX_TARGETS = 10
#: The content type of a streamed answer (``progress=true``): one JSON object per line, the progress lines
#: first, the answer (or its error) last.
PROGRESS_TYPE = "application/x-ndjson"


@dataclass(frozen=True)
class Defaults:
    """What a request leaves out: the archive's settings."""

    image_size: int = 224
    method: str = "unioncam"
    theta: float = 10.0
    num_classes: int = 1000
    interpolation: str = "bilinear"  #: how uploads are resized: the model's own (a timm model's pretrained_cfg)


@dataclass
class Item:
    """One image to answer, with its validated options."""

    pixels: torch.Tensor
    method: str
    #: A class, ``None`` (the predicted class), or a list of classes (answered with a list).
    target: int | list[int] | None
    theta: float
    format: str
    decode_ms: float
    #: ``target=topK`` with K ≥ 2: the K most probable classes, most probable first (answered with a list).
    top_k: int | None = None

    @property
    def targets(self) -> int:
        """How many classes this item explains."""
        return self.top_k or (len(self.target) if isinstance(self.target, list) else 1)

    @property
    def several(self) -> bool:
        """Answered with a list of explanations (a list of targets, or top-K with K ≥ 2)."""
        return self.top_k is not None or isinstance(self.target, list)


@dataclass
class Request:
    kind: str  #: ``"plain"`` (one answer), ``"v1"`` (KServe v1: a list), ``"v2"`` (KServe v2 outputs)
    explain: bool
    items: list[Item] = field(default_factory=list)
    #: The instance index of each item (KServe requests: an instance that failed is not among the items).
    positions: list[int] = field(default_factory=list)
    #: Instances that failed, by instance index: each is answered with its error, the others as usual.
    errors: dict[int, InvalidInputError] = field(default_factory=dict)
    #: The v2 request's ``id``, echoed in the answer.
    id: str | None = None
    #: The client asked for progress (``progress=true``, plain explanation requests): the answer streams
    #: as JSON lines (:data:`PROGRESS_TYPE`), progress lines while it runs, the answer last.
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.positions:
            self.positions = list(range(len(self.items)))

    def fail(self, j: int, exc: InvalidInputError) -> None:
        """Answer item ``j`` with ``exc`` and keep serving the others; raise ``exc`` if it was the last one
        (a request whose every instance is wrong gets the error as its answer)."""
        if len(self.items) == 1:
            raise exc
        self.errors[self.positions.pop(j)] = exc
        self.items.pop(j)


def _isolated(kind: str, explain: bool, entries: list[Any], make: Any, request_id: str | None = None) -> Request:
    """A KServe request's instances, each parsed alone by ``make(i, entry)``: a wrong instance is answered
    with its error and the others are served; when every one is wrong, the first error is raised."""
    req = Request(kind, explain, id=request_id)
    for i, entry in enumerate(entries):
        try:
            req.items.append(make(i, entry))
            req.positions.append(i)
        except InvalidInputError as exc:
            req.errors[i] = exc
    if not req.items:
        raise req.errors[0]
    return req


def _flag(value: Any, name: str) -> bool:
    value = _text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.lower() in ("true", "1", "yes", "on")
    raise InvalidInputError(name, f"is {value!r}", "true or false")


def _progress(req: Request, value: Any) -> Request:
    """``req`` with the client's ``progress`` choice, refused where a stream of lines cannot carry the answer."""
    if value is None or not req.explain:  # predictions are one forward: nothing to follow
        return req
    req.progress = _flag(value, "progress")
    if req.progress and req.items[0].format != "json":
        raise InvalidInputError("progress", f"cannot stream with format={req.items[0].format} (a PNG is one body)",
                                "progress=true with format=json (the default), or format=png without progress")
    return req


def _text(value: Any) -> Any:
    """Multipart form fields arrive as bytes; options are text."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            return value
    return value


def _image(value: Any, name: str, size: int, interpolation: str = "bilinear") -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    if isinstance(value, dict) and "b64" in value:  # KServe v1's binary convention
        value = value["b64"]
    if isinstance(value, str):
        if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,<data>
            value = value.split(",", 1)[1]
        try:  # `base64` without -w0 wraps lines: whitespace is not an error
            value = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            # A text file uploaded as a form part (TorchServe hands text/* parts over as text), or text
            # that was meant as base64: either way not an image.
            head = " ".join(value.split())[:40]
            raise InvalidInputError(
                name, f"is text, not an image ({len(value)} characters, starting {head!r}; nor is it base64 "
                "of one)", "an image file (PNG, JPEG, …), or its bytes in base64") from None
    elif not isinstance(value, (bytes, bytearray)):
        kind = "null" if value is None else type(value).__name__
        raise InvalidInputError(name, f"is a JSON {kind}", "an image file, or its bytes in base64")
    pixels = to_pixels(decode_image(value, field=name), size=size, interpolation=interpolation)
    return pixels, (time.perf_counter() - start) * 1000


def _target(value: Any, defaults: Defaults) -> tuple[int | list[int] | None, int | None]:
    """``target`` → ``(target, top_k)``: a class, ``None`` (predicted), a list of classes, or top-K."""
    value = _text(value)
    n = defaults.num_classes
    accepted = (f"an integer in [0, {n - 1}]; 'top1' or omitted for the predicted class; 'topK' (K ≤ "
                f"{MAX_TARGETS}) for the K most probable; or up to {MAX_TARGETS} classes as a list or '281,285'")
    if value is None or value == "" or value == "top1":
        return None, None
    if isinstance(value, str) and value.lower().startswith("top"):
        k = value[3:]
        if not k.isdigit() or not 1 <= int(k) <= MAX_TARGETS:
            raise InvalidInputError("target", f"{value!r} is not top1…top{MAX_TARGETS}", accepted)
        return (None, None) if int(k) == 1 else (None, int(k))
    several = isinstance(value, list) or (isinstance(value, str) and "," in value)
    entries = value if isinstance(value, list) else str(value).split(",") if several else [value]
    if not entries or len(entries) > MAX_TARGETS:
        raise InvalidInputError("target", f"lists {len(entries)} classes", accepted)
    classes = []
    for entry in entries:
        if isinstance(entry, str):
            try:
                entry = int(entry.strip())
            except ValueError:
                raise InvalidInputError("target", f"{entry!r} is not a class index", accepted) from None
        try:
            classes.append(validate_target(entry, n))
        except InvalidInputError as exc:
            raise InvalidInputError("target", exc.problem, accepted) from None
    return (classes if several else classes[0]), None


def _options(fields: dict[str, Any], defaults: Defaults) -> tuple[str, int | list[int] | None, int | None, float, str]:
    method = validate_method(_text(fields.get("method", defaults.method)))
    target, top_k = _target(fields.get("target"), defaults)
    theta = _text(fields.get("theta", defaults.theta))
    if isinstance(theta, str):
        try:
            theta = float(theta)
        except ValueError:
            raise InvalidInputError("theta", f"{theta!r} is not a number", "a number in [0, 100]") from None
    theta = validate_theta(theta)
    fmt = _text(fields.get("format", "json"))
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise InvalidInputError("format", f"{fmt!r} is not a known format", ", ".join(FORMATS))
    if fmt.lower() == "png" and (top_k is not None or isinstance(target, list)):
        raise InvalidInputError("format", "'png' is one image but the target asks for several classes",
                                "format json for several classes, or one target with png")
    return method, target, top_k, theta, fmt.lower()


def _item(image: Any, options: dict[str, Any], name: str, defaults: Defaults) -> Item:
    method, target, top_k, theta, fmt = _options(options, defaults)
    pixels, ms = _image(image, name, defaults.image_size, defaults.interpolation)
    return Item(pixels, method, target, theta, fmt, ms, top_k)


def _parameters(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(name, f"is a JSON {type(value).__name__}", "a JSON object of options")
    return value


def _looks_like_json(body: Any) -> bool:
    # No image format starts with "{" or "[" (PNG, JPEG, GIF, BMP, TIFF, WebP all have other magic bytes).
    head = body.lstrip()[:1] if isinstance(body, (bytes, bytearray, str)) else None
    return head in (b"{", b"[", "{", "[")


def _json(body: bytes | bytearray | str) -> Any:
    try:
        text = body if isinstance(body, str) else bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("body", "starts like JSON but is not UTF-8 text", "a JSON object, or an image file")
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidInputError("body", "is JSON nested too deeply", "a JSON object a few levels deep") from None
    except ValueError as exc:
        raise InvalidInputError("body", f"is not valid JSON ({exc})", "a complete JSON object") from None


def parse(row: dict[str, Any], explain: bool, defaults: Defaults, content_type: str | None = None) -> Request:
    """One request of a TorchServe batch → :class:`Request`; raises :class:`InvalidInputError` saying why not.

    ``explain``: TorchServe's per-request ``explain`` header (the ``/explanations`` and ``:explain`` routes).
    A v2 body explains when its ``parameters`` say ``"explain": true`` (KServe has no v2 explain route).
    ``content_type``: the request's ``Content-Type`` header, when known (it only sharpens error messages).
    """
    if not isinstance(row, dict) or not row:
        if content_type and content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            raise InvalidInputError("body", "is an urlencoded form (curl -d / --data-binary without a content type)",
                                    "a raw image body with -H 'Content-Type: image/png' (or --data-binary "
                                    "@file -H 'Content-Type: application/octet-stream'), multipart (curl -F), "
                                    "or JSON")
        raise InvalidInputError("body", "is empty", "an image file, a multipart form or a JSON object")
    body = next((row[k] for k in ("body", "data") if k in row), None)
    if len(row) == 1 and _looks_like_json(body):
        body = _json(body)  # JSON sent as text/plain, octet-stream, or that TorchServe could not decode
    if isinstance(body, list):
        raise InvalidInputError("body", "is a JSON list", "a JSON object with 'image', 'instances' or 'inputs'")
    if isinstance(body, dict) and len(row) == 1:
        if "image" in body and "progress" in body:  # a plain JSON request
            body = dict(body)
            flag = body.pop("progress")
            return _progress(_parse_json(body, explain, defaults), flag)
        return _parse_json(body, explain, defaults)
    if isinstance(body, (int, float, bool)) or (body is None and len(row) == 1 and ("body" in row or "data" in row)):
        raise InvalidInputError("body", f"is a JSON {type(body).__name__ if body is not None else 'null'}",
                                "a JSON object, an image file or a multipart form")
    # multipart form (one field per option) or a raw image body
    name = next((k for k in IMAGE_FIELDS if k in row), None)
    if name is None:
        raise InvalidInputError(
            "image", f"is missing (form fields: {sorted(map(str, row))})", f"a form field named one of {IMAGE_FIELDS}"
        )
    others = [k for k in IMAGE_FIELDS if k in row and k != name]
    if others:
        raise InvalidInputError("image", f"is given twice (fields {[name, *others]})", "one image per request")
    fields = {k: v for k, v in row.items() if k != name}
    flag = fields.pop("progress", None)
    unknown = sorted(set(map(str, fields)) - set(OPTIONS))
    if unknown:
        raise InvalidInputError("options", f"unknown field(s) {unknown}", ", ".join(OPTIONS) + ", progress")
    return _progress(Request("plain", explain, [_item(row[name], fields, "image", defaults)]), flag)


def _known(options: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(map(str, options)) - set(OPTIONS))
    if unknown:
        raise InvalidInputError(where, f"has unknown key(s) {unknown}", ", ".join(OPTIONS))
    return options


def _parse_json(body: dict[str, Any], explain: bool, defaults: Defaults) -> Request:
    kinds = [k for k in ("instances", "inputs", "image") if k in body]
    if len(kinds) > 1:
        raise InvalidInputError("body", f"has both {kinds[0]!r} and {kinds[1]!r}", "one of 'image', 'instances' "
                                "(KServe v1) or 'inputs' (KServe v2)")
    if "instances" in body:  # KServe v1
        extra = sorted(set(body) - {"instances", "parameters"})
        if extra:
            raise InvalidInputError("body", f"has unknown key(s) {extra} beside 'instances'", "instances, parameters")
        inst = body["instances"]
        if not isinstance(inst, list) or not 1 <= len(inst) <= MAX_INSTANCES:
            raise InvalidInputError("instances", f"is not a list of 1 to {MAX_INSTANCES} items",
                                    f"1–{MAX_INSTANCES} instances")
        shared = _known(_parameters(body.get("parameters"), "parameters"), "parameters")

        def instance(i: int, x: Any) -> Item:
            if isinstance(x, dict) and "b64" not in x:
                keys = [k for k in ("image", "data") if k in x]
                if len(keys) != 1:
                    raise InvalidInputError(f"instances[{i}]", "has no image" if not keys else "has two images",
                                            "{'image': {'b64': <base64>}, ...options}")
                image = x[keys[0]]
                opts = _known({k: v for k, v in x.items() if k != keys[0]}, f"instances[{i}]")
            else:
                image, opts = x, {}
            return _item(image, {**shared, **opts}, f"instances[{i}]", defaults)

        return _isolated("v1", explain, inst, instance)
    if "inputs" in body:  # KServe v2 / open inference protocol
        extra = sorted(set(body) - {"inputs", "parameters", "id", "outputs"})
        if extra:
            raise InvalidInputError("body", f"has unknown key(s) {extra} beside 'inputs'", "id, inputs, parameters")
        inputs = body["inputs"]
        accepted = "[{'name': 'image', 'datatype': 'BYTES', 'shape': [n], 'data': [base64, ...]}]"
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
            raise InvalidInputError("inputs", "is not a list of tensors", accepted)
        if len(inputs) != 1:
            raise InvalidInputError("inputs", f"has {len(inputs)} tensors; one is read", accepted)
        tensor = inputs[0]
        if tensor.get("datatype", "BYTES") != "BYTES":
            raise InvalidInputError("inputs[0].datatype", f"is {tensor.get('datatype')!r}", "BYTES (base64 images)")
        data = tensor.get("data")
        if not isinstance(data, list) or not 1 <= len(data) <= MAX_INSTANCES:
            raise InvalidInputError("inputs[0].data", f"is not a list of 1 to {MAX_INSTANCES} images", "base64 strings")
        shape = tensor.get("shape")
        if shape is not None and shape != [len(data)]:
            raise InvalidInputError("inputs[0].shape", f"is {shape!r} for {len(data)} images", f"[{len(data)}]")
        opts = dict(_parameters(body.get("parameters"), "parameters"))
        opts.update(_parameters(tensor.get("parameters"), "inputs[0].parameters"))
        # Explanations over v2 go through /infer: no KServe server has a v2 explain route.
        flag = opts.get("explain", False)
        if not isinstance(flag, bool):
            raise InvalidInputError("parameters.explain", f"is {flag!r}", "true (explain) or false (predict)")
        request_id = body.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidInputError("id", f"is a JSON {type(request_id).__name__}", "a string")
        opts = {k: v for k, v in opts.items() if k in OPTIONS}  # KServe adds its own parameters (content_type …)
        return _isolated("v2", explain or flag, data,
                         lambda i, d: _item(d, opts, f"inputs[0].data[{i}]", defaults), request_id)
    if "image" not in body:
        raise InvalidInputError("image", f"is missing (keys: {sorted(map(str, body))})",
                                "a JSON object {'image': <base64>, ...}")
    opts = _known({k: v for k, v in body.items() if k != "image"}, "options")
    return Request("plain", explain, [_item(body["image"], opts, "image", defaults)])


# ------------------------------------------------------------------------------------------ answers


def predictions_body(probs: torch.Tensor, categories: list[str], k: int = 5) -> list[list[dict[str, Any]]]:
    """Top-``k`` classes of each row of ``probs`` ``[N, classes]``."""
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
    return [[{"class": c, "class_name": categories[c], "probability": p} for c, p in zip(ci, pi)]
            for ci, pi in zip(indices, values)]


def explanation_body(res: Any, category: str, timings: dict[str, float]) -> dict[str, Any]:
    """An :class:`~unioncam.Explanation` as JSON.

    The map is an object ``{"dtype": "float16", "byteorder": sys.byteorder, "shape": [H, W], "data": <base64
    of the row-major values>}``; the other fields are ``class``, ``class_name``, ``score``, ``method``,
    ``details`` and ``timings``.
    """
    data = base64.b64encode(res.saliency.to(torch.float16).numpy().tobytes()).decode("ascii")
    return {
        "class": res.target,
        "class_name": category,
        "score": res.score,
        "method": res.method,
        "map": {"dtype": "float16", "byteorder": sys.byteorder, "shape": list(res.saliency.shape), "data": data},
        "details": res.details,
        "timings": timings,
    }


def encode(req: Request, answers: list[Any], model_name: str) -> tuple[Any, str]:
    """The response body and content type for ``req``'s answers (dicts, lists, or PNG bytes).

    An explanation of several classes is a list of explanation objects: a plain request's body is then
    ``{"explanations": [...]}``, a KServe instance's answer the list itself. A KServe instance that failed
    (:attr:`Request.errors`) is answered in its place with its :func:`error_body`; a v2 answer echoes the
    request's ``id``.
    """
    if req.kind == "plain":
        ans = answers[0]
        if req.progress:  # the stream's last line
            body = {"explanations": ans} if isinstance(ans, list) else ans
            return json.dumps(body, separators=(",", ":")) + "\n", PROGRESS_TYPE
        if isinstance(ans, bytes):
            return ans, "image/png"
        if req.explain and isinstance(ans, list):
            return {"explanations": ans}, "application/json"
        return (ans if req.explain else {"predictions": ans}), "application/json"
    answers = [base64.b64encode(a).decode("ascii") if isinstance(a, bytes) else a for a in answers]
    if req.errors:  # the failed instances' errors in their places
        by_position = dict(zip(req.positions, answers))
        by_position.update({i: error_body(400, exc) for i, exc in req.errors.items()})
        answers = [by_position[i] for i in sorted(by_position)]
    name = "explanations" if req.explain else "predictions"
    if req.kind == "v1":
        return {name: answers}, "application/json"
    body = {"model_name": model_name}
    if req.id is not None:
        body["id"] = req.id
    body["outputs"] = [{"name": name, "datatype": "BYTES", "shape": [len(answers)],
                        "data": [json.dumps(a) for a in answers]}]
    return body, "application/json"


def progress_line(done: int, total: int | None, elapsed_s: float, state: str) -> str:
    """One progress line of a streamed answer: ``{"progress": {...}}`` and a newline.

    ``state``: ``"waiting"`` (the batch runs another explanation first), ``"explaining"`` or ``"done"``;
    ``done``/``total``: masked forwards (``total`` ``null`` until known); ``percent`` and ``eta_s`` (the
    seconds left at the rate so far) are ``null`` until they mean something.
    """
    percent = None if not total else round(100.0 * done / total, 1)
    eta = None if not total or not done else round(elapsed_s * (total - done) / done, 2)
    body = {"state": state, "done": done, "total": total, "percent": percent, "elapsed_s": round(elapsed_s, 2),
            "eta_s": eta}
    return json.dumps({"progress": body}, separators=(",", ":")) + "\n"


def error_body(code: int, exc: InvalidInputError) -> dict[str, Any]:
    """``{"code", "error": {"field", "problem", "accepted"}, "message"}``."""
    return {"code": code, "error": {"field": exc.field, "problem": exc.problem, "accepted": exc.accepted},
            "message": str(exc)}
