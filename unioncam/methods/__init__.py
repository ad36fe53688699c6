"""The CAM methods: one class each over the shared core, found by name in one registry.

Every module of this package is imported here, so a new method is one class (decorated with
:func:`register`) in a new file of this folder; a user's own method can be registered from any module.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import CommonDetails, GradientMethod, Method, Options, Result, final, register, registry

# Every module of this folder registers its methods on import (their ``rank`` orders the list).
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
    importlib.import_module(f"{__name__}.{_mod}")

from .groupcam import GroupCAMDetails  # noqa: E402
from .scorecam import ScoreCAMDetails, region_map  # noqa: E402
from .unioncam import UnionCAMDetails, select, union  # noqa: E402

#: The methods shipped with the package, by name (``unioncam.METHODS``); :func:`registry` also has any
#: registered later.
METHODS: tuple[str, ...] = tuple(registry())


def get(name: str) -> Method:
    """The registered method called ``name`` (validate the name first: :func:`unioncam.validation.validate_method`)."""
    return registry()[name]


__all__ = [
    "METHODS",
    "CommonDetails",
    "GradientMethod",
    "GroupCAMDetails",
    "Method",
    "Options",
    "Result",
    "ScoreCAMDetails",
    "UnionCAMDetails",
    "final",
    "get",
    "region_map",
    "register",
    "registry",
    "select",
    "union",
]
