"""The ``Method`` contract: a CAM method says how it weights the layer's activations; the core does the rest.

The core (:mod:`unioncam.core`) runs the one forward/backward (:class:`~unioncam.core.Pass`), the chunked
scorer and the bookkeeping; a method only turns a :class:`Pass` into maps and its typed details. To add
a method, subclass :class:`Method` (or :class:`GradientMethod` for a closed-form weighting of ``A`` and
``W``) and decorate it with :func:`register`: the API, the command line and the server then accept its name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict

import torch

from ..core.capture import Pass
from ..core.scorer import Scorer
from ..kernels import minmax_norm, up

__all__ = ["CommonDetails", "GradientMethod", "Method", "Options", "Result", "final", "register", "registry"]


class CommonDetails(TypedDict):
    """Details every method reports."""

    layer: str  #: the explained layer
    channels: int  #: its channel count ``K``
    masked_forwards: int  #: masked forwards this image cost (0 for gradient methods)
    seconds: float  #: wall time of the explanation, shared evenly by the images explained together


@dataclass(frozen=True)
class Options:
    """Per-call settings a method may read."""

    theta: float = 10.0  #: UnionCAM's AMD percentile θ


@dataclass
class Result:
    """What :meth:`Method.run` gives back for a batch of ``B`` images.

    ``saliency``: ``[B, H, W]`` in ``[0, 1]`` on the device. ``per_image``: tensors ``[B]`` (one value per
    image) or plain values shared by the batch, named as the method's ``Details`` keys. All reach the
    host together, once.
    """

    saliency: torch.Tensor
    per_image: dict[str, Any] = field(default_factory=dict)


def final(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``norm(up(relu(map)))``: the last step of every activation-weighting method."""
    return minmax_norm(up(raw.float().clamp_min(0), size))


class Method(abc.ABC):
    """One CAM method over the shared core.

    Class attributes:
        name: what users pass as ``method=``.
        needs_gradients: whether :meth:`run` reads ``Pass.grads`` (else no backward is taken).
        masked: whether it scores masked inputs (its cost is counted in masked forwards).
        Details: a ``TypedDict`` of the details it reports (on top of :class:`CommonDetails`).
        rank: where it is listed (lower first; equal ranks in registration order).
    """

    name: ClassVar[str]
    rank: ClassVar[int] = 100
    needs_gradients: ClassVar[bool] = True
    masked: ClassVar[bool] = False
    Details: ClassVar[type] = CommonDetails

    @abc.abstractmethod
    def run(self, p: Pass, scorer: Scorer, options: Options) -> Result:
        """Maps (and per-image details) of the images in ``p``."""

    def details(self, per_image: dict[str, Any], options: Options) -> dict[str, Any]:
        """One image's details from its host-side values; override to rename or format them."""
        return per_image

    def planned_forwards(self, channels: int) -> int | None:
        """The most masked forwards one row (image, class) costs for a layer of ``channels`` channels.

        A progress bar's total (:class:`unioncam.core.progress.Progress`); pruned channels are taken off
        it through :meth:`Scorer.skip`. ``None``: the method cannot say (the bar then counts without a
        total). A method without masked forwards costs 0.
        """
        return None if self.masked else 0


class GradientMethod(Method):
    """A method whose map is ``Σ_k w_k(A, W) A_k`` (or any closed form of ``A`` and ``W``): no masked forwards."""

    @abc.abstractmethod
    def weigh(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The raw map ``[B, h, w]`` from float32 ``A`` and ``W`` ``[B, K, h, w]``."""

    def run(self, p: Pass, scorer: Scorer, options: Options) -> Result:
        assert p.grads is not None
        return Result(final(self.weigh(p.acts.float(), p.grads.float()), p.size))


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls.name`` a method every entry point accepts."""
    name = cls.name.lower()
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({type(_REGISTRY[name]).__name__})")
    _REGISTRY[name] = cls()
    ordered = sorted(_REGISTRY.items(), key=lambda kv: kv[1].rank)  # stable: equal ranks keep their order
    _REGISTRY.clear()
    _REGISTRY.update(ordered)
    return cls


def registry() -> dict[str, Method]:
    """Every registered method by name, by rank then registration order."""
    return _REGISTRY
