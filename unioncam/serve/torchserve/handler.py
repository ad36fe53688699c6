"""TorchServe's handler: the archive's entry point, a thin adapter of :mod:`unioncam.serve.service`.

TorchServe calls the module-level :func:`handle` with a batch of request rows and its ``Context``, whose
methods (``get_request_header``, ``set_response_status``, ``set_response_header`` …) are the very ones
:class:`~unioncam.serve.service.UnionCAMService` speaks: nothing is translated.
"""

from __future__ import annotations

from typing import Any

from ..service import DELAY_ENV, UnionCAMService

__all__ = ["DELAY_ENV", "UnionCAMHandler", "handle"]


class UnionCAMHandler(UnionCAMService):
    """Serves ``/predictions`` (top-5 classes) and ``/explanations`` (a saliency map per request)."""


_service = UnionCAMHandler()


def handle(data: list[dict[str, Any]], context: Any) -> list[Any] | None:
    """TorchServe's module-level entry point."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
