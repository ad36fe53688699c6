"""The one guarded import of Triton, and the rule that picks a kernel over its torch twin.

The package must work where Triton is absent (macOS, Windows, minimal installs), so kernels are only
defined when ``triton`` imports. Every op's public function asks :func:`use_triton` and nothing else,
and launches its kernel through :func:`launch`, so that one rule decides the path everywhere:

- ``UNIONCAM_TRITON=0`` in the environment forces the torch twins. It is read at every call (not at
  import), so it can be set or cleared at any time, tests included.
- A kernel that fails to build or launch (Triton cannot compile it, or cannot build its launcher for
  want of a C compiler or the CUDA headers) is not fatal: :func:`launch` raises
  :class:`KernelUnavailable`, the op's public function calls :func:`fall_back`, which warns once
  (a ``RuntimeWarning`` naming the op and the cause), and from then on that op goes straight to its
  twin for the rest of the process.

Loops in kernels whose trip count is a runtime integer are written as ``while`` loops, not
``range(...)``: Triton 3.6's interpreter turns a runtime bound into a Python int with
``int(array_of_shape_(1,))``, which NumPy 2.4 and later reject with a ``TypeError``; the interpreter
evaluates a ``while`` condition with ``bool()``, which NumPy still allows, and the compiler lowers both
forms to a loop on the GPU.
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

HAS_TRITON: bool = triton is not None

#: Triton's interpreter (CPU) runs programs one after another: kernels give each program more rows there.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Environment variable that, set to ``0``, forces the torch twins (read at every call).
SWITCH: str = "UNIONCAM_TRITON"

#: CUDA's limits on a launch grid: axis 0, then axes 1 and 2.
MAX_GRID_X: int = 2**31 - 1
MAX_GRID_YZ: int = 65_535

#: Ops whose kernel failed in this process, with the reason; they run their twin from then on.
_FAILED: dict[str, str] = {}

__all__ = [
    "HAS_TRITON",
    "INTERPRETED",
    "MAX_GRID_X",
    "MAX_GRID_YZ",
    "SWITCH",
    "KernelUnavailable",
    "fall_back",
    "launch",
    "on_gpu",
    "tl",
    "triton",
    "triton_enabled",
    "use_triton",
]


class KernelUnavailable(RuntimeError):
    """A Triton kernel could not be built or launched; ``op`` names the op, ``__cause__`` says why."""

    def __init__(self, op: str, cause: BaseException) -> None:
        super().__init__(f"{op}: {type(cause).__name__}: {cause}")
        self.op = op


def triton_enabled() -> bool:
    """False when the environment sets ``UNIONCAM_TRITON=0``; read now, not at import."""
    return os.environ.get(SWITCH, "1").strip() != "0"


def on_gpu(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives on a CUDA device (the only place compiled kernels run)."""
    return all(t.is_cuda for t in tensors)


def use_triton(*tensors: torch.Tensor, op: str | None = None) -> bool:
    """True when the Triton path should run: Triton imports, ``UNIONCAM_TRITON`` is not ``0``, ``op``'s
    kernel has not failed in this process, and every tensor lives on a CUDA device."""
    return HAS_TRITON and triton_enabled() and (op is None or op not in _FAILED) and on_gpu(*tensors)


def launch(op: str, kernel: object, grid: tuple[int, ...], *args: object, **kwargs: object) -> None:
    """``kernel[grid](*args, **kwargs)``; any failure to compile, build the launcher or launch is
    re-raised as :class:`KernelUnavailable` so that the op's public function can fall back."""
    try:
        kernel[grid](*args, **kwargs)  # type: ignore[index]
    except Exception as e:  # Triton raises many types here (CompilationError, CalledProcessError, ...)
        raise KernelUnavailable(op, e) from e


def fall_back(op: str, error: KernelUnavailable) -> None:
    """Record that ``op``'s kernel is unusable in this process and warn, the first time only."""
    if op in _FAILED:
        return
    cause = error.__cause__ if error.__cause__ is not None else error
    reason = f"{type(cause).__name__}: {cause}"
    if len(reason) > 600:  # compiler errors can run to pages; the head says what failed
        reason = reason[:600] + " ..."
    _FAILED[op] = reason
    warnings.warn(
        f"unioncam: the Triton kernel of {op!r} failed to build or launch ({reason}); {op!r} uses its torch "
        f"twin for the rest of this process. Set {SWITCH}=0 to use the torch twins from the start and "
        "silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
