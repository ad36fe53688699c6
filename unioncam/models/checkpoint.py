"""Reading a state dict from a user's file, with the same clear errors for every architecture."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["read_state_dict"]


def read_state_dict(weights: str | os.PathLike, accepted: str) -> tuple[dict, Path]:
    """The state dict in the file ``weights`` (a ``{"state_dict": …}`` wrapper unwrapped) and its path.

    Raises ``FileNotFoundError`` naming ``accepted`` (the other things ``weights`` may be) when there is no
    such file, and ``ValueError`` when the file is not a torch checkpoint holding a state dict.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights: {str(weights)!r} is neither {accepted} nor an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and weights-only errors all mean "not a checkpoint"
        raise ValueError(f"weights: {path} is not a readable torch checkpoint ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path} does not hold a state dict (got {type(state).__name__})")
    return state, path
