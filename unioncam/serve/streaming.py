"""Progress of explanations streamed to the clients that asked (``progress=true``), through TorchServe.

The backend supplies the sender (:func:`unioncam.serve.torchserve.handler.torchserve_sender`); a backend
without one (KServe's model server answers in one body) sends nothing.

TorchServe sends a worker's intermediate responses (``ts.handler_utils.utils.send_intermediate_predict_response``)
to their clients as HTTP chunks and the handler's return value as the last one. Its batch aggregator
decides from the *first* request of each message whether the batch is finished, so every intermediate
message here goes to every streaming request of the batch at once: each gets its own line (``waiting``
while the batch runs another explanation, ``explaining``, ``done``) and all get the same number of lines.
Requests that did not ask are never in an intermediate message: they get today's single answer.

The lines are :func:`unioncam.serve.protocol.progress_line`'s; the answer's encoding is
:func:`unioncam.serve.protocol.encode`'s (one JSON line for a streaming request).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..core.progress import Progress
from . import protocol

logger = logging.getLogger(__name__)

__all__ = ["INTERVAL_S", "ProgressStream", "Sender"]

#: Least seconds between two progress messages of a batch (the first one goes at once).
INTERVAL_S = 0.25

Sender = Callable[[dict[int, str], dict[int, str], Any], None]


class ProgressStream:
    """The streaming requests of one batch, their progress, and the messages that carry it.

    Args:
        context: TorchServe's context (``request_ids``, response content types).
        streaming: the batch's request indices that asked for progress.
        send: sends one intermediate message (``lines`` and ``ids`` by request index); ``None``: nothing
            is sent (outside TorchServe), the answers are still lines.
    """

    def __init__(self, context: Any, streaming: Sequence[int], send: Sender | None,
                 interval_s: float | None = None) -> None:
        self.context = context
        ids = getattr(context, "request_ids", None) or {}
        self.ids = {idx: str(ids.get(idx, idx)) for idx in streaming}
        self.send = send if self.ids else None
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.state: dict[int, dict[str, Any]] = {
            idx: {"state": "waiting", "done": 0, "total": None, "start": None} for idx in self.ids}
        self.messages = 0
        self._last = 0.0
        for idx in self.ids:
            context.set_response_content_type(idx, protocol.PROGRESS_TYPE)

    @property
    def started(self) -> bool:
        """Whether a message went out (the HTTP status of the streaming requests is then 200)."""
        return self.messages > 0

    def watch(self, idxs: Sequence[int], parts: Sequence[tuple[Any, int]]) -> Progress | None:
        """A :class:`Progress` for one engine call that answers requests ``idxs``; ``None`` when none streams."""
        mine = [i for i in dict.fromkeys(idxs) if i in self.state]
        if not mine or not any(getattr(m, "masked", False) for m, _ in parts):
            return None  # a gradient method is one forward/backward: nothing to follow, the answer comes at once
        now = time.monotonic()
        for i in mine:
            self.state[i].update(state="explaining", start=now)

        def listener(done: int, total: int | None) -> None:
            for i in mine:
                self.state[i].update(done=done, total=total)
            self._tick(first=total is not None and done == 0)

        return Progress(parts, bar=False, listener=listener)

    def finish(self, idxs: Sequence[int]) -> None:
        """The engine call for ``idxs`` ended: a message goes at once, whatever the interval, so a client
        always sees its last count (``done``) before the answer, however fast the explanation was."""
        mine = [i for i in idxs if i in self.state]
        for i in mine:
            self.state[i]["state"] = "done"
        if mine:
            self._tick(first=True)

    def lines(self, out: list[Any]) -> None:
        """Make the streaming requests' answers in ``out`` single JSON lines (errors included), once a
        message went out: after it, the last line is the whole answer."""
        if not self.started:
            return
        for idx in self.ids:
            if isinstance(out[idx], dict):
                out[idx] = json.dumps(out[idx], separators=(",", ":")) + "\n"
                self.context.set_response_content_type(idx, protocol.PROGRESS_TYPE)

    def _tick(self, first: bool = False) -> None:
        if self.send is None:
            return
        now = time.monotonic()
        if not first and now - self._last < self.interval_s:
            return
        self._last = now
        lines = {}
        for idx, s in self.state.items():
            elapsed = now - s["start"] if s["start"] is not None else 0.0
            lines[idx] = protocol.progress_line(s["done"], s["total"], elapsed, s["state"])
        try:
            self.send(lines, dict(self.ids), self.context)
            self.messages += 1
        except Exception:  # noqa: BLE001 — a client gone or a socket error: the answer still goes at the end
            logger.exception("a progress message could not be sent; the answers follow without it")
            self.send = None
