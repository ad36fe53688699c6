"""What every method shares: the captured forward/backward pass and the chunked scorer."""

from .capture import Pass, black_probs, forward_pass, model_device, model_dtype
from .fast import FastPath, resolve_fast
from .scorer import DEFAULT_BATCH_SIZE, PRECISIONS, Scorer, backend_flags, default_batch_size, resolve_precision, use_device

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FastPath",
    "PRECISIONS",
    "Pass",
    "Scorer",
    "backend_flags",
    "black_probs",
    "default_batch_size",
    "forward_pass",
    "model_device",
    "model_dtype",
    "resolve_fast",
    "resolve_precision",
    "use_device",
]
