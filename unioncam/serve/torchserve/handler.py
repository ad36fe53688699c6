"""TorchServe's handler: the archive's entry point, a thin adapter of :mod:`unioncam.serve.service`.

TorchServe calls the module-level :func:`handle` with a batch of request rows and its ``Context``, whose
methods (``get_request_header``, ``set_response_status``, ``set_response_header`` …) are the very ones
:class:`~unioncam.serve.service.UnionCAMService` speaks: nothing is translated.
"""

from __future__ import annotations

from typing import Any

from ..service import DELAY_ENV, UnionCAMService
from ..streaming import Sender

__all__ = ["DELAY_ENV", "UnionCAMHandler", "handle", "torchserve_sender"]


def torchserve_sender(context: Any) -> Sender | None:
    """TorchServe's intermediate-response call for ``context``; ``None`` outside a TorchServe worker."""
    if getattr(context, "cl_socket", None) is None:
        return None
    try:
        from ts.handler_utils.utils import send_intermediate_predict_response
    except ImportError:
        return None

    def send(lines: dict[int, str], ids: dict[int, str], ctx: Any) -> None:
        send_intermediate_predict_response(lines, ids, "Intermediate Prediction success", 200, ctx)

    return send


class UnionCAMHandler(UnionCAMService):
    """Serves ``/predictions`` (top-5 classes) and ``/explanations`` (a saliency map per request)."""

    def progress_sender(self, context: Any) -> Sender | None:
        return torchserve_sender(context)


_service = UnionCAMHandler()


def handle(data: list[dict[str, Any]], context: Any) -> list[Any] | None:
    """TorchServe's module-level entry point."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
