"""The service both backends run: decode → validate → engine → encode, one answer per request of a batch.

The wire format is :mod:`unioncam.serve.protocol`'s and the algorithm the package's; this class holds what
a route does, written once. Each backend translates its framework's request objects to a batch of rows
and a *context* in the shape of TorchServe's (``system_properties``, ``model_yaml_config``,
``get_request_header``, ``set_response_status`` …): :mod:`unioncam.serve.torchserve.handler` hands it
TorchServe's own, :mod:`unioncam.serve.kserve.model` builds one per request. Every request of a batch is parsed, validated and answered on its own,
so one bad upload gets its own 4xx (``context.set_response_status(code, phrase, idx)``) while the others
of its batch are still served. TorchServe itself is imported only for its metric dimensions, and only when
the context has metrics, so the handler runs in-process (tests, the GPU check) without it.

An archive made for a GPU (``device: cuda`` in its settings) changes two things, whatever device the worker
actually got: the explanation requests of one batch with the same method and θ go through one
:func:`~unioncam.explain_batch` (their masked inputs share chunks), and an explanation that finds every
slot of its GPU taken waits for one up to the archive's bound (:class:`~unioncam.serve.limits.Slots`).
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
from ..api import explain, explain_batch, prepare
from ..core.capture import black_probs, model_dtype
from ..core.fast import resolve_fast
from ..core.scorer import resolve_precision, use_device
from ..errors import InvalidInputError
from ..methods import get as get_method
from ..models import load_model
from ..validation import validate_method, validate_precision, validate_theta
from ..viz import overlay_png
from . import protocol
from .limits import Slots, WorkerLease, explanation_seconds
from .protocol import Item, Request
from .streaming import ProgressStream, Sender

logger = logging.getLogger(__name__)

__all__ = ["DELAY_ENV", "UnionCAMService"]

#: Test hook: seconds every masked-forward explanation holds its slot on top of its work (unset: none).
DELAY_ENV = "UNIONCAM_SERVE_TEST_DELAY_S"


def _worker_device(gpu_id: Any) -> tuple[torch.device, str | None]:
    """The worker's device from TorchServe's ``gpu_id``, and the log line of a fall-back to the CPU.

    TorchServe passes ``None`` (or no key) when it was started without GPUs; ``cuda:None`` would fail.
    """
    if gpu_id is None or gpu_id == "":
        return torch.device("cpu"), "TorchServe gave this worker no GPU (gpu_id None: number_of_gpu=0 or none visible)"
    try:
        index = int(gpu_id)
    except (TypeError, ValueError):
        return torch.device("cpu"), f"gpu_id {gpu_id!r} is not a GPU index"
    if not torch.cuda.is_available():
        return torch.device("cpu"), f"gpu_id {index} but CUDA is not available to torch here"
    if not 0 <= index < torch.cuda.device_count():
        return torch.device("cpu"), f"gpu_id {index} but torch sees {torch.cuda.device_count()} GPU(s)"
    return torch.device(f"cuda:{index}"), None


class UnionCAMService:
    """Serves ``/predictions`` (top-5 classes) and ``/explanations`` (a saliency map per request)."""

    def __init__(self) -> None:
        self.initialized = False
        self._stream: ProgressStream | None = None

    def progress_sender(self, context: Any) -> Sender | None:
        """How this backend sends a progress message to its streaming clients; ``None``: it cannot (the
        answers are still single JSON lines)."""
        return None

    def initialize(self, context: Any) -> None:
        """Load the archived model and settings (``model-config.yaml``'s ``handler`` section)."""
        props = context.system_properties
        model_dir = props.get("model_dir")
        cfg = dict((context.model_yaml_config or {}).get("handler", {}) or {})
        self.layer = cfg.get("layer") or None
        self.batch_size = int(cfg["batch_size"]) if cfg.get("batch_size") is not None else None
        self.device, note = _worker_device(props.get("gpu_id"))
        if note is not None:  # a warning where a GPU was there to use
            logger.log(logging.WARNING if torch.cuda.is_available() else logging.INFO,
                       "unioncam handler: %s: serving on the CPU", note)
        use_device(self.device)  # Triton kernels and CUDA graphs run on the current device: this worker's GPU
        #: The archive's settings were made for a GPU: share chunks across a batch, queue for slots.
        self.gpu_settings = cfg.get("device", "cpu") == "cuda"
        # An archive's "auto" is decided here, on this worker's device; one older than it meant fp32.
        self.precision = resolve_precision(validate_precision(cfg.get("precision", "fp32")), self.device)
        #: The threads torch takes on this machine for a process alone: what the live workers share.
        self.cores = torch.get_num_threads()
        #: OMP_NUM_THREADS in the workers' environment fixes their threads; else they follow the live workers.
        self.fixed_threads = bool(os.environ.get("OMP_NUM_THREADS"))
        # Explanations with masked forwards at once across this model's workers (they share model_dir);
        # with GPU settings, per GPU. Each worker holds a lease for its life: the slots follow the live ones.
        key = f"{model_dir}:{context.model_name}"
        group = (str(self.device.index) if self.device.type == "cuda" else "cpu") if self.gpu_settings else ""
        self.lease = WorkerLease(key, group)
        self.slots = Slots(f"{key}:{group}", cfg.get("explain_slots"), self.lease,
                           wait_s=float(cfg.get("explain_wait_s") or 0))
        # Until the first batch counts them: the archive's workers (the others may still be starting).
        self._fit_threads(int((context.model_yaml_config or {}).get("minWorkers", 1) or 1))
        self.delay_s = float(os.environ.get(DELAY_ENV) or 0)
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
            interpolation=getattr(self.model, "interpolation", "bilinear"),
        )
        size = (self.defaults.image_size, self.defaults.image_size)
        # b = f_c(0) once at start-up: every UnionCAM request then reuses the engine's cached value.
        black_probs(self.model, size, self.device, model_dtype(self.model))
        # With torch.compile or CUDA graphs switched on (UNIONCAM_COMPILE / UNIONCAM_CUDA_GRAPHS), the
        # worker's start-up pays for compiling and capturing the chunk forward, not its first request.
        if resolve_fast(self.device).compile or resolve_fast(self.device).cuda_graphs:
            warm = prepare(self.model, size, method=self.defaults.method, batch_size=self.batch_size,
                           precision=self.precision)
            logger.info("unioncam fast path warmed up: %s", warm)
        self.context = context
        self.initialized = True
        logger.info(
            "unioncam handler ready: engine %s from %s, model %s, weights %s, image %d, method %s, theta %g, "
            "device %s (%s settings), precision %s, explanation slots %s (wait %g s)", __version__,
            os.path.dirname(os.path.dirname(os.path.dirname(__file__))), name, source,
            self.defaults.image_size, self.defaults.method, self.defaults.theta, self.device,
            "gpu" if self.gpu_settings else "cpu", self.precision,
            "live workers - 1" if self.slots.fixed is None else self.slots.fixed, self.slots.wait_s,
        )

    # ------------------------------------------------------------------------------------ answering

    def _fit_threads(self, live: int | None = None) -> None:
        """On a CPU the model's ``live`` workers (default: counted now) share the cores: each takes
        ``cores // live`` threads. Refitted before every batch, so a worker scaled up or down through the
        management API (or one that died) changes the others' threads at their next batch.
        ``OMP_NUM_THREADS`` set for the workers fixes them."""
        if self.device.type != "cpu" or self.fixed_threads:
            return
        live = max(1, self.lease.live() if live is None else live)
        threads = max(1, self.cores // live)
        if threads != torch.get_num_threads():
            logger.info("unioncam handler: %d worker(s) share %d threads: %d each", live, self.cores, threads)
            torch.set_num_threads(threads)

    def _predict(self, items: list[Item]) -> list[list[dict[str, Any]]]:
        x = torch.stack([it.pixels for it in items]).to(self.device)
        with torch.no_grad():
            probs = self.model(x).float().softmax(-1)
        return protocol.predictions_body(probs, self.categories)

    def _seconds(self, item: Item) -> float:
        """The estimated seconds of ``item`` on this worker's device (all its classes)."""
        return explanation_seconds(item.method, self.defaults.image_size, self.device.type, self.gflops,
                                   self.channels, item.targets, precision=self.precision)

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

    def _run(self, items: list[Item], progress: Any = False) -> tuple[list[list[Any]], float]:
        """The explanations of ``items`` (a list per item) and the milliseconds they took.

        One item: :func:`~unioncam.explain`, the same map as the library's on this image. Several (one
        class each, same method and θ): one :func:`~unioncam.explain_batch`, their masked inputs scored
        in shared chunks; each map equals the library's on its own image to float rounding (the chunks
        hold other images, so a convolution may sum in another order).
        """
        start = time.perf_counter()
        first = items[0]
        if len(items) == 1:
            out = explain(self.model, first.pixels, method=first.method, target=first.target, top_k=first.top_k,
                          theta=first.theta, layer=self.layer, batch_size=self.batch_size, precision=self.precision,
                          progress=progress)
            results = [out if isinstance(out, list) else [out]]
        else:
            out = explain_batch(self.model, [it.pixels for it in items], targets=[it.target for it in items],
                                method=first.method, theta=first.theta, layer=self.layer,
                                batch_size=self.batch_size, precision=self.precision, progress=progress)
            results = [[r] for r in out]
        if self.delay_s and get_method(first.method).masked:
            time.sleep(self.delay_s)
        return results, (time.perf_counter() - start) * 1000

    def _encode(self, item: Item, results: list[Any], explain_ms: float, idx: int, shared: int = 1):
        for res in results:
            res.details["weights"] = self.weights_label
            self._metrics(res, explain_ms / len(results) / shared, idx)
        t0 = time.perf_counter()
        if item.format == "png":
            return overlay_png(item.pixels, results[0].saliency)
        timings = {"decode_ms": item.decode_ms, "explain_ms": explain_ms}
        if shared > 1:
            timings["shared_with"] = shared  # explain_ms is the whole shared call's
        bodies = [protocol.explanation_body(res, self.categories[res.target], dict(timings)) for res in results]
        for body in bodies:
            body["timings"]["encode_ms"] = (time.perf_counter() - t0) * 1000
        return bodies if item.several else bodies[0]

    def _metrics(self, res: Any, explain_ms: float, idx: int) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            from ts.metrics.dimension import Dimension
        except ImportError:  # in-process without TorchServe (the GPU check): metrics are TorchServe's
            return

        # Fresh dimension lists every call: the metrics API appends to the list it is given.
        metrics.add_time("ExplanationLatency", explain_ms, idx=idx, unit="ms",
                         dimensions=[Dimension("Method", res.method)])
        metrics.add_counter("MaskedForwards", int(res.details["masked_forwards"]), idx=idx,
                            dimensions=[Dimension("Method", res.method)])
        if res.method == "unioncam":
            pruned = res.details["channels"] - res.details["active_channels"]
            metrics.add_counter("PrunedChannels", int(pruned), idx=idx, dimensions=[Dimension("Method", res.method)])
            metrics.add_counter("SelectedMap", 1, idx=idx, dimensions=[Dimension("Selected", res.details["selected"])])

    def _units(self, reqs: dict[int, Request]) -> list[list[tuple[int, int, Item]]]:
        """The engine calls of a batch's explanation requests: each a list of (request, item index, item).

        CPU settings: one call per item. GPU settings: items of one class each with the same method and θ
        share one call (across requests); any other item runs on its own.
        """
        units: list[list[tuple[int, int, Item]]] = []
        groups: dict[tuple[str, float], list[tuple[int, int, Item]]] = {}
        for idx, req in reqs.items():
            for j, it in enumerate(req.items):
                if self.gpu_settings and not it.several:
                    groups.setdefault((it.method, it.theta), []).append((idx, j, it))
                else:
                    units.append([(idx, j, it)])
        return units + list(groups.values())

    def _explain_unit(self, context: Any, unit: list[tuple[int, int, Item]], answers: dict, failed: dict) -> None:
        """Run one engine call under a slot (masked methods); a failure falls back to each item alone."""
        unit = [u for u in unit if u[0] not in failed]
        if not unit:
            return
        slow = get_method(unit[0][2].method).masked
        seconds = sum(self._seconds(it) for _, _, it in unit)
        with (self.slots.acquire(seconds) if slow else contextlib.nullcontext(True)) as free:
            if not free:
                for idx, _, it in unit:
                    failed.setdefault(idx, ("busy", None))
                return
            watch = self._stream.watch([idx for idx, _, _ in unit], [(get_method(unit[0][2].method), sum(
                it.targets for _, _, it in unit))]) if self._stream is not None else None
            try:
                results, ms = self._run([it for _, _, it in unit], watch or False)
            except Exception as exc:  # noqa: BLE001 — one call for several requests: retry each alone
                if len(unit) == 1:
                    failed.setdefault(unit[0][0], ("error", exc))
                    if isinstance(exc, torch.cuda.OutOfMemoryError):
                        _free_cuda_memory()
                    return
                logger.warning("shared explanation of %d requests failed (%s); each runs alone",
                               len(unit), type(exc).__name__)
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    _free_cuda_memory()
                results = None
            if results is not None:
                for (idx, j, it), res in zip(unit, results):
                    answers[(idx, j)] = self._encode(it, res, ms, idx, len(unit))
                if self._stream is not None:
                    self._stream.finish([idx for idx, _, _ in unit])
                return
        for u in unit:  # outside the slot: each takes its own
            self._explain_unit(context, [u], answers, failed)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """Answer every request of the batch: a dict (JSON), bytes (PNG) or a JSON error with a 4xx/5xx."""
        self.context = context
        self._fit_threads()
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
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    _free_cuda_memory()
                for idx in {i for i, _, _ in pred}:
                    self._fail_error(context, idx, out, exc, "prediction")
                    parsed.pop(idx, None)
        explaining: dict[int, Request] = {}
        for idx, req in list(parsed.items()):
            if req.explain:
                try:  # before taking a slot: a refused request holds none; a refused instance alone fails
                    for j in reversed(range(len(req.items))):
                        try:
                            self._admit(req.items[j])
                        except InvalidInputError as exc:
                            req.fail(j, exc)
                except InvalidInputError as exc:
                    self._fail(context, idx, out, 400, exc)
                    parsed.pop(idx)
                    continue
                explaining[idx] = req
        failed: dict[int, tuple[str, Exception | None]] = {}
        # Clients that asked for progress (progress=true) get it streamed while their explanation runs.
        streaming = [idx for idx, req in explaining.items() if req.progress]
        self._stream = ProgressStream(context, streaming, self.progress_sender(context)) if streaming else None
        for unit in self._units(explaining):
            self._explain_unit(context, unit, answers, failed)
        for idx, req in parsed.items():
            if idx in failed:
                kind, exc = failed[idx]
                if kind == "busy":
                    self._busy(context, idx, out, req)
                elif isinstance(exc, InvalidInputError):
                    self._fail(context, idx, out, 400, exc)
                else:
                    logger.error("request %d failed: %s: %s", idx, type(exc).__name__, exc)
                    self._fail_error(context, idx, out, exc, "request")
                continue
            try:
                body, content_type = protocol.encode(req, [answers[(idx, j)] for j in range(len(req.items))],
                                                     context.model_name)
                context.set_response_content_type(idx, content_type)
                out[idx] = body
            except InvalidInputError as exc:
                self._fail(context, idx, out, 400, exc)
            except Exception as exc:  # noqa: BLE001
                logger.exception("request %d failed", idx)
                self._fail(context, idx, out, 500, InvalidInputError("request", f"failed in the engine: {exc}"))
        if self._stream is not None:
            self._stream.lines(out)  # after progress lines, an error too is a line
        return out

    def _fail_error(self, context: Any, idx: int, out: list[Any], exc: Exception, what: str) -> None:
        """A 507 for running out of GPU memory (the worker goes on serving), else a 500."""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            context.set_response_header(idx, "Retry-After", "5")
            said = str(exc).splitlines()[0][:160] if str(exc) else "CUDA out of memory"
            self._fail(context, idx, out, 507, InvalidInputError(
                "server", f"ran out of GPU memory on this {what} ({said}); "
                "the memory was released and the worker goes on serving",
                "a retry after a few seconds (Retry-After), fewer classes per request, or an archive "
                "with a smaller --batch-size"))
            return
        self._fail(context, idx, out, 500, InvalidInputError(what, f"failed in the engine: {exc}"))

    def _busy(self, context: Any, idx: int, out: list[Any], req: Request) -> None:
        """503 + Retry-After: every explanation slot is taken (TorchServe would otherwise queue it)."""
        own = max(self._seconds(it) for it in req.items)
        seconds = max(1, math.ceil(max(own, self.slots.estimated_wait_s)))
        context.set_response_header(idx, "Retry-After", str(seconds))
        waited = f" and the wait for one was estimated over {self.slots.wait_s:g} s" if self.slots.wait_s else ""
        self._fail(context, idx, out, 503, InvalidInputError(
            "server", f"is running {self.slots.n} explanation(s) with masked forwards, its limit{waited}",
            f"a retry after about {seconds} s (Retry-After), or a gradient method (gradcam, layercam, ...)"))

    @staticmethod
    def _fail(context: Any, idx: int, out: list[Any], code: int, exc: InvalidInputError) -> None:
        out[idx] = protocol.error_body(code, exc)
        context.set_response_content_type(idx, "application/json")
        # The reason phrase goes into the HTTP status line: ASCII only; the JSON body has the full message.
        phrase = {500: "Internal Server Error", 503: "Service Unavailable",
                  507: "Insufficient Storage"}.get(code, f"invalid {exc.field}")
        phrase = phrase.encode("ascii", "replace").decode("ascii")[:80]
        context.set_response_status(code, phrase, idx)


def _free_cuda_memory() -> None:
    """After an out-of-memory error: hand the cached blocks back so the next request starts clean."""
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


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
