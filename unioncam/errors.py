"""The one error type for bad input."""

from __future__ import annotations

__all__ = ["InvalidInputError"]


class InvalidInputError(ValueError):
    """An argument or upload is not acceptable.

    ``field`` names the input (``"image"``, ``"target"``, ``"theta"`` …); the message says what was wrong
    and what is accepted. Servers map it to HTTP 400.
    """

    def __init__(self, field: str, problem: str, accepted: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.accepted = accepted
        msg = f"{field}: {problem}"
        if accepted:
            msg += f" (accepted: {accepted})"
        super().__init__(msg)
