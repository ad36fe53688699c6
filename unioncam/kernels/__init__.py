"""Fused kernels and their plain torch twins.

Each ``<op>.py`` holds the op's torch twin and, where one exists, its Triton kernel; the public
function of each op (``denoise``, ``upsampled_range``, ``masked_inputs``) is the one place that picks
the path. This package imports nothing from the rest of ``unioncam``.

Kernels run for CUDA tensors when Triton imports. ``UNIONCAM_TRITON=0`` in the environment (read at
every call) forces the torch twins; a kernel that cannot be built or launched warns once and its op
uses the twin for the rest of the process (see ``_triton``).
"""

from .denoise import denoise, denoise_torch
from .maps import minmax_norm, up
from .masks import masked_inputs, masked_inputs_torch, upsampled_range, upsampled_range_torch

__all__ = [
    "denoise",
    "denoise_torch",
    "masked_inputs",
    "masked_inputs_torch",
    "minmax_norm",
    "up",
    "upsampled_range",
    "upsampled_range_torch",
]
