"""KServe's backend: a ``kserve.Model`` that hands each request to :class:`~unioncam.serve.service.UnionCAMService`.

KServe's data plane decodes the body (v1: a JSON object, or the raw bytes of a non-JSON content type; v2: an
``InferRequest``) and calls :meth:`UnionCAMModel.predict` (``:predict``, ``/infer``) or
:meth:`UnionCAMModel.explain` (``:explain``). Each becomes one row of a batch of one for the service, with a
context in the shape of TorchServe's that records the answer's status and headers: the service parses,
limits, explains and encodes exactly as it does under TorchServe, so the same request gets the same JSON.

The model keeps ``minWorkers`` replicas of the service (each its own copy of the network, as TorchServe's
workers are processes): a request takes a free replica, or waits for one. A model's hooks are set per
explanation, so two requests never share a replica. The replicas count as the model's workers for the
explanation slots (:class:`~unioncam.serve.limits.Slots`): with two, one explanation with masked forwards
runs at a time and a second gets 503 with ``Retry-After`` while predictions are still served.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import kserve
from kserve.protocol.infer_type import InferRequest

from ..service import UnionCAMService
from .layout import read_layout

logger = logging.getLogger(__name__)

__all__ = ["Answer", "UnionCAMModel"]


class Answer(Exception):  # noqa: N818 — not an error: a finished HTTP answer that KServe's encoders would alter
    """A finished answer (an error with its status and headers, or a PNG) that the server sends as it is."""

    def __init__(self, status: int, body: Any, content_type: str = "application/json",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.content_type, self.headers = status, body, content_type, dict(headers or {})


class _Context:
    """The part of TorchServe's ``Context`` the service uses, for one request (row 0) of one replica."""

    def __init__(self, model_name: str, model_dir: Path, config: dict[str, Any], gpu_id: int | None,
                 headers: dict[str, str] | None = None) -> None:
        self.model_name = model_name
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id}
        self.model_yaml_config = config
        self.metrics = None  # KServe's server keeps its own Prometheus metrics (/metrics)
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.status: int | None = None
        self.content_type = "application/json"
        self.response_headers: dict[str, str] = {}

    def for_request(self, headers: dict[str, str]) -> _Context:
        return _Context(self.model_name, Path(self.system_properties["model_dir"]), self.model_yaml_config,
                        self.system_properties["gpu_id"], headers)

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.headers.get(key.lower())

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_type = value

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers[key] = value


def v2_body(request: InferRequest) -> dict[str, Any]:
    """An ``InferRequest`` back as the v2 JSON object the protocol parses (TorchServe gets that object)."""
    inputs = []
    for t in request.inputs:
        tensor = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": t.data}
        if t.parameters:
            tensor["parameters"] = dict(t.parameters)
        inputs.append(tensor)
    body: dict[str, Any] = {"inputs": inputs}
    if request.id is not None:
        body["id"] = request.id
    if request.parameters:
        body["parameters"] = dict(request.parameters)
    return body


class UnionCAMModel(kserve.Model):
    """``name`` served from ``model_dir`` (``unioncam archive --kserve``'s folder) on ``device``."""

    def __init__(self, name: str, model_dir: str | Path, device: str = "cpu", replicas: int | None = None) -> None:
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.device = device
        self.config = read_layout(self.model_dir)
        self.replicas = max(1, int(replicas or self.config.get("minWorkers", 1) or 1))
        self.services: list[UnionCAMService] = []
        self._free: asyncio.Queue | None = None

    def load(self) -> bool:
        import torch

        gpus = torch.cuda.device_count() if self.device == "cuda" else 0
        for i in range(self.replicas):
            service = UnionCAMService()
            service.initialize(_Context(self.name, self.model_dir, self.config, i % gpus if gpus else None))
            self.services.append(service)
        self.ready = True
        return self.ready

    @property
    def defaults(self):
        return self.services[0].defaults

    async def _answer(self, payload: Any, headers: dict[str, str] | None, explain: bool) -> Any:
        headers = dict(headers or {})
        if isinstance(payload, InferRequest):
            row = {"body": v2_body(payload)}
        else:
            row = {"body": payload}
        if explain:
            headers["explain"] = "True"
        if self._free is None:  # made on the server's event loop, at the first request
            self._free = asyncio.Queue()
            for service in self.services:
                self._free.put_nowait(service)
        service = await self._free.get()
        try:
            ctx = service.context.for_request(headers)
            out = await asyncio.to_thread(service.handle, [row], ctx)
        finally:
            self._free.put_nowait(service)
        body = out[0]
        if ctx.status is not None and ctx.status != 200:
            raise Answer(ctx.status, body, "application/json", ctx.response_headers)
        if isinstance(body, (bytes, bytearray)):  # format png on a plain body
            raise Answer(200, bytes(body), ctx.content_type, ctx.response_headers)
        if isinstance(payload, InferRequest) and "id" not in body:
            body = {"model_name": body["model_name"], "id": str(uuid.uuid4()), "outputs": body["outputs"]}
        return body

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        """``:predict`` (v1) and ``/infer`` (v2; ``"parameters": {"explain": true}`` explains)."""
        return await self._answer(payload, headers, explain=False)

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        """``:explain`` (v1): the explanations of the request's instances."""
        return await self._answer(payload, headers, explain=True)

    def stop(self) -> None:
        for service in self.services:
            lease = getattr(service, "lease", None)
            if lease is not None:
                lease.close()
        self.ready = False
