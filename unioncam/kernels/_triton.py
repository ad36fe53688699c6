"""The one guarded import of Triton, and the rule that picks a kernel over its torch twin.

The package must work where Triton is absent (macOS, Windows, minimal installs), so kernels are only
defined when ``triton`` imports. Every op's public function asks :func:`use_triton` and nothing else.

Loops in kernels whose trip count is a runtime integer are written as ``while`` loops, not
``range(...)``: Triton 3.6's interpreter turns a runtime bound into a Python int with
``int(array_of_shape_(1,))``, which NumPy 2.4 and later reject with a ``TypeError``; the interpreter
evaluates a ``while`` condition with ``bool()``, which NumPy still allows, and the compiler lowers both
forms to a loop on the GPU.
"""

from __future__ import annotations

import os

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

__all__ = ["HAS_TRITON", "INTERPRETED", "triton", "tl", "use_triton"]


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when Triton is importable and every tensor lives on a CUDA device."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)
