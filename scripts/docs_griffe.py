"""A griffe extension for the API pages (mkdocs.yml: mkdocstrings' ``extensions``).

The docstrings cross-reference with Sphinx roles (``:func:`unioncam.explain```, ``:class:`~x.Y```), which
Markdown would show as written; they become inline code here (``~`` keeps the last name only).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|data|mod|meth|attr|exc|obj|const):`(~?)([^`]+)`")


def _code(m: re.Match) -> str:
    name = m.group(2)
    return f"`{name.rsplit('.', 1)[-1] if m.group(1) else name}`"


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
