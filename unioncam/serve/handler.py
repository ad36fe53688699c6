"""TorchServe handler: decode → validate → engine → encode, one answer per request of a batch.

The wire format is :mod:`unioncam.serve.protocol`'s and the algorithm the package's; this class only
adapts TorchServe's calls to them. Every request of a batch is parsed, validated and answered on its own,
so one bad upload gets its own 4xx (``context.set_response_status(code, phrase, idx)``) while the others
of its batch are still served. TorchServe itself is imported only for its metric dimensions, so the
handler runs in-process in tests without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any

import torch

from .. import __version__
from ..api import explain
from ..core.capture import black_probs, model_dtype
from ..core.scorer import resolve_precision
from ..errors import InvalidInputError
from ..methods import get as get_method
from ..models import load_model
from ..validation import validate_method, validate_precision, validate_theta
from ..viz import overlay_png
from . import protocol
from .limits import Slots, explanation_seconds
from .protocol import Item, Request

logger = logging.getLogger(__name__)

__all__ = ["UnionCAMHandler", "handle"]


class UnionCAMHandler:
    """Serves ``/predictions`` (top-5 classes) and ``/explanations`` (a saliency map per request)."""

    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Load the archived model and settings (``model-config.yaml``'s ``handler`` section)."""
        props = context.system_properties
        model_dir = props.get("model_dir")
        cfg = dict((context.model_yaml_config or {}).get("handler", {}) or {})
        self.layer = cfg.get("layer") or None
        self.batch_size = int(cfg["batch_size"]) if cfg.get("batch_size") is not None else None
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu")
        # An archive's "auto" is decided here, on this worker's device; one older than it meant fp32.
        self.precision = resolve_precision(validate_precision(cfg.get("precision", "fp32")), self.device)
        workers = int((context.model_yaml_config or {}).get("minWorkers", 1) or 1)
        if self.device.type == "cpu" and workers > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
        # Explanations with masked forwards at once across this model's workers (they share model_dir).
        self.slots = Slots(f"{model_dir}:{context.model_name}", cfg.get("explain_slots"))
        name = cfg.get("model", "vgg16")
        if cfg.get("weights", "file") == "random":
            seed = int(cfg.get("seed", 0))
            self.model = load_model(name, "random", seed=seed, device=self.device)
            source = f"random (seed {seed})"
            logger.warning("unioncam handler: %s has RANDOM weights (seed %d): its classes and maps mean nothing",
                           name, seed)
        else:
            source = os.path.join(model_dir, cfg.get("weights_file", "vgg16.pth"))
            self.model = load_model(name, source, device=self.device)
        # Named in every explanation's details: "random (seed 0)", "imagenet", "shipped" or the user's file.
        self.weights_label = source if cfg.get("weights", "file") == "random" else str(cfg.get("source", "file"))
        names_file = os.path.join(model_dir, "index_to_name.json")
        if os.path.isfile(names_file):
            with open(names_file) as f:
                names = json.load(f)
            self.categories = [names.get(str(i), str(i)) for i in range(len(names))]
        else:
            self.categories = list(self.model.categories)
        # One forward's cost and the explained layer's channels (from the archive): the time estimates.
        self.gflops = float(cfg["forward_gflops"]) if cfg.get("forward_gflops") is not None else None
        self.channels = int(cfg.get("channels", 512))
        self.timeout = int((context.model_yaml_config or {}).get("responseTimeout", 120) or 120)
        self.defaults = protocol.Defaults(
            image_size=int(cfg.get("image_size", 224)),
            method=validate_method(cfg.get("method", "unioncam")),
            theta=validate_theta(cfg.get("theta", 10.0)),
            num_classes=len(self.categories),
        )
        size = (self.defaults.image_size, self.defaults.image_size)
        # b = f_c(0) once at start-up: every UnionCAM request then reuses the engine's cached value.
        black_probs(self.model, size, self.device, model_dtype(self.model))
        self.context = context
        self.initialized = True
        logger.info(
            "unioncam handler ready: engine %s from %s, model %s, weights %s, image %d, method %s, theta %g, "
            "device %s, precision %s", __version__, os.path.dirname(os.path.dirname(os.path.dirname(__file__))), name, source,
            self.defaults.image_size, self.defaults.method, self.defaults.theta, self.device,
            self.precision,
        )

    # ------------------------------------------------------------------------------------ answering

    def _predict(self, items: list[Item]) -> list[list[dict[str, Any]]]:
        x = torch.stack([it.pixels for it in items]).to(self.device)
        with torch.no_grad():
            probs = self.model(x).float().softmax(-1)
        return protocol.predictions_body(probs, self.categories)

    def _seconds(self, item: Item) -> float:
        """The estimated seconds of ``item`` on this worker's device (all its classes)."""
        return explanation_seconds(item.method, self.defaults.image_size, self.device.type, self.gflops,
                                   self.channels, item.targets)

    def _admit(self, item: Item) -> None:
        """Refuse several classes of a masked method that would take over half the response timeout."""
        if not (item.several and get_method(item.method).masked):
            return
        seconds = self._seconds(item)
        if seconds > self.timeout / 2:
            raise InvalidInputError(
                "target", f"asks for {item.targets} {item.method} explanations, about {seconds:.0f} s "
                f"here, more than half the server's response timeout ({self.timeout} s)",
                "fewer classes per request, or a gradient method (gradcam, layercam, ...)")

    def _explain(self, item: Item, idx: int) -> dict[str, Any] | list[dict[str, Any]] | bytes:
        start = time.perf_counter()
        # One explanation per call: the map is then the same as unioncam.explain on this image, whatever
        # else shares the batch; masked inputs are already batched inside one explanation. Several classes
        # of one image share its forward and their masked inputs share chunks.
        out = explain(self.model, item.pixels, method=item.method, target=item.target, top_k=item.top_k,
                      theta=item.theta, layer=self.layer, batch_size=self.batch_size, precision=self.precision)
        explain_ms = (time.perf_counter() - start) * 1000
        results = out if isinstance(out, list) else [out]
        for res in results:
            res.details["weights"] = self.weights_label
            self._metrics(res, explain_ms / len(results), idx)
        t0 = time.perf_counter()
        if item.format == "png":
            return overlay_png(item.pixels, results[0].saliency)
        bodies = [protocol.explanation_body(res, self.categories[res.target],
                                            {"decode_ms": item.decode_ms, "explain_ms": explain_ms})
                  for res in results]
        for body in bodies:
            body["timings"]["encode_ms"] = (time.perf_counter() - t0) * 1000
        return bodies if item.several else bodies[0]

    def _metrics(self, res: Any, explain_ms: float, idx: int) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        from ts.metrics.dimension import Dimension

        # Fresh dimension lists every call: the metrics API appends to the list it is given.
        metrics.add_time("ExplanationLatency", explain_ms, idx=idx, unit="ms",
                         dimensions=[Dimension("Method", res.method)])
        metrics.add_counter("MaskedForwards", int(res.details["masked_forwards"]), idx=idx,
                            dimensions=[Dimension("Method", res.method)])
        if res.method == "unioncam":
            pruned = res.details["channels"] - res.details["active_channels"]
            metrics.add_counter("PrunedChannels", int(pruned), idx=idx, dimensions=[Dimension("Method", res.method)])
            metrics.add_counter("SelectedMap", 1, idx=idx, dimensions=[Dimension("Selected", res.details["selected"])])

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """Answer every request of the batch: a dict (JSON), bytes (PNG) or a JSON error with a 4xx/5xx."""
        self.context = context
        out: list[Any] = [None] * len(data)
        parsed: dict[int, Request] = {}
        for idx, row in enumerate(data):
            # Lets a client (and the tests) see which requests shared a handler call.
            context.set_response_header(idx, "X-Batch-Size", str(len(data)))
            # TorchServe marks explanation requests with the header explain=True, per request.
            explain_ = _header(context, idx, "explain") == "True"
            try:
                content_type = _header(context, idx, "Content-Type")
                parsed[idx] = protocol.parse(row, explain_, self.defaults, content_type)
            except InvalidInputError as exc:
                self._fail(context, idx, out, 400, exc)
            except Exception as exc:  # noqa: BLE001 — a request we failed to read fails alone, as our fault
                logger.exception("request %d could not be parsed", idx)
                self._fail(context, idx, out, 500, InvalidInputError(
                    "body", f"could not be read ({type(exc).__name__}: {str(exc)[:200]})"))
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
                    for it in req.items:  # before taking a slot: a refused request holds none
                        self._admit(it)
                    slow = any(get_method(it.method).masked for it in req.items)
                    with (self.slots.acquire() if slow else contextlib.nullcontext(True)) as free:
                        if not free:
                            self._busy(context, idx, out, req)
                            continue
                        for j, it in enumerate(req.items):
                            answers[(idx, j)] = self._explain(it, idx)
                body, content_type = protocol.encode(req, [answers[(idx, j)] for j in range(len(req.items))],
                                                     context.model_name)
                context.set_response_content_type(idx, content_type)
                out[idx] = body
            except InvalidInputError as exc:
                self._fail(context, idx, out, 400, exc)
            except Exception as exc:  # noqa: BLE001
                logger.exception("request %d failed", idx)
                self._fail(context, idx, out, 500, InvalidInputError("request", f"failed in the engine: {exc}"))
        return out

    def _busy(self, context: Any, idx: int, out: list[Any], req: Request) -> None:
        """503 + Retry-After: every explanation slot is taken (TorchServe would otherwise queue it)."""
        seconds = max(1, math.ceil(max(self._seconds(it) for it in req.items)))
        context.set_response_header(idx, "Retry-After", str(seconds))
        self._fail(context, idx, out, 503, InvalidInputError(
            "server", f"is running {self.slots.n} explanation(s) with masked forwards, its limit",
            f"a retry after about {seconds} s (Retry-After), or a gradient method (gradcam, layercam, ...)"))

    @staticmethod
    def _fail(context: Any, idx: int, out: list[Any], code: int, exc: InvalidInputError) -> None:
        out[idx] = protocol.error_body(code, exc)
        context.set_response_content_type(idx, "application/json")
        # The reason phrase goes into the HTTP status line: ASCII only; the JSON body has the full message.
        phrase = {500: "Internal Server Error", 503: "Service Unavailable"}.get(code, f"invalid {exc.field}")
        phrase = phrase.encode("ascii", "replace").decode("ascii")[:80]
        context.set_response_status(code, phrase, idx)


def _header(context: Any, idx: int, name: str) -> str | None:
    """A request header, whatever case the frontend passed its name in; ``None`` if absent or unreadable."""
    for key in (name, name.lower()):
        try:
            value = context.get_request_header(idx, key)
        except Exception:  # noqa: BLE001 — a stand-in context may not know headers
            return None
        if value is not None:
            return str(value)
    return None


_service = UnionCAMHandler()


def handle(data: list[dict[str, Any]], context: Any) -> list[Any] | None:
    """TorchServe's module-level entry point."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
