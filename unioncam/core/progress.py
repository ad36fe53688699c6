"""Progress over the masked forwards of a whole job, with its total known before the first one runs.

A job is one or several ``(method, rows)`` parts (a row: one image, or one (image, class) pair). Each
method says how many masked forwards a row costs at most for a layer of ``K`` channels
(:meth:`unioncam.methods.Method.planned_forwards`); the layer's ``K`` is read on the ``meta`` device
before the forward/backward starts (:func:`layer_channels`), or from the first pass where the model
cannot run there. Channels whose map is constant are pruned once the pass is known: the methods then
:meth:`Progress.skip` them, so the total shrinks to the exact count before the masked forwards begin,
and the bar ends at the number that actually ran.

:class:`Progress` draws a tqdm bar (``n/total``, %, rate, ETA) and/or calls ``listener(done, total)``
(the server streams those to a client that asked).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Progress", "layer_channels"]


def layer_channels(model: nn.Module, layer: tuple[str, nn.Module], size: tuple[int, int],
                   reshape: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int | None:
    """The channel count ``K`` of ``layer``'s output (after ``reshape``) for ``size`` images, from one forward
    on the ``meta`` device (no memory, no arithmetic, the model untouched); ``None`` where that forward
    cannot run (an operation without a meta kernel, say)."""
    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta") for k, v in
             [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    seen: dict[str, int] = {}

    class _Stop(Exception):
        pass

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            t = reshape(out) if reshape is not None else out
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                seen["K"] = int(t.shape[1])
        raise _Stop  # the rest of the network is not needed

    handle = layer[1].register_forward_hook(hook)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            functional_call(model, state, (torch.zeros(1, 3, *size, device="meta"),), strict=False,
                            tie_weights=False)
    except _Stop:
        pass
    except Exception:  # noqa: BLE001 — any failure just means: learn K from the real pass
        return None
    finally:
        handle.remove()
    return seen.get("K")


class Progress:
    """Counts a job's masked forwards against their planned total; draws a bar and/or tells a listener.

    Args:
        parts: ``(method, rows)`` pairs, the whole job in order (a method: a
            :class:`~unioncam.methods.Method`, anything with ``name`` and ``planned_forwards(K)``).
        bar: draw a tqdm bar (on stderr).
        listener: called as ``listener(done, total)`` on every update (``total`` is ``None`` until ``K``
            is known).
    """

    def __init__(self, parts: Sequence[tuple[Any, int]], *, bar: bool = True,
                 listener: Callable[[int, int | None], None] | None = None) -> None:
        self.parts = [(m, int(r)) for m, r in parts]
        self.listener = listener
        self.done = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            first = self.parts[0][0].name if self.parts else "explain"
            self._bar = tqdm(total=None, desc=f"{first}: forward/backward", unit="fwd", dynamic_ncols=True)

    @property
    def planned(self) -> bool:
        """Whether the job has any masked forward to count (no bar is worth drawing otherwise)."""
        return any(getattr(m, "masked", False) for m, _ in self.parts)

    def learn_channels(self, channels: int) -> None:
        """Set the total from the layer's channel count (the first call wins: one layer per job)."""
        if self.total is not None:
            return
        total = 0
        for method, rows in self.parts:
            per_row = method.planned_forwards(channels)
            if per_row is None:  # a method that cannot say: the bar counts without a total
                return
            total += rows * per_row
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()
        self._tell()

    def phase(self, method_name: str, what: str) -> None:
        """Name what runs now on the bar (``"forward/backward"``, ``"masked forwards"``)."""
        if self._bar is not None:
            self._bar.set_description_str(f"{method_name} {what}" if what != "forward/backward"
                                          else f"{method_name}: {what}", refresh=True)

    def update(self, n: int) -> None:
        """``n`` more masked forwards ran."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        self._tell()

    def skip(self, n: int) -> None:
        """``n`` planned forwards will not run (pruned channels): the total shrinks by them."""
        if n <= 0 or self.total is None:
            return
        self.total -= n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()
        self._tell()

    def write(self, line: str) -> None:
        """Print ``line`` (to stdout) above the bar without breaking it."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line)

    def close(self) -> None:
        """End the bar at the count that actually ran (the total was an upper bound where it differs)."""
        if self.total != self.done and self.done > 0:
            self.total = self.done
            if self._bar is not None:
                self._bar.total = self.done
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()

    def _tell(self) -> None:
        if self.listener is not None:
            self.listener(self.done, self.total)
