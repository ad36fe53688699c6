"""MkDocs hooks (mkdocs.yml: ``hooks``): links from the pages to the repository's own files.

A page may link to any file of the repository outside ``docs/`` with a relative link, as it would on a
code host (``[the JSON](../benchmarks/results/latency-cpu-64.json)``). Such a file is copied into the
site under ``repo/`` and the link pointed at the copy, so the built site is self-contained and MkDocs'
own validation checks the link; a link to a file that does not exist is a warning, which
``mkdocs build --strict`` turns into an error.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

log = logging.getLogger("mkdocs.plugins.unioncam_docs")

# [text](../path) or [text](../path#anchor); also image links ![...](../path)
LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)((?:#[^)\s]*)?\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _outside(docs: Path, page_dir: str, target: str) -> Path | None:
    """The repository file a relative link of a page in ``page_dir`` points to, if outside docs/."""
    path = (docs / page_dir / target).resolve()
    try:
        path.relative_to(docs.resolve())
        return None
    except ValueError:
        return path


def _links(markdown: str):
    text = FENCE.sub("", markdown)
    return LINK.finditer(text)


def on_files(files, config):
    docs = Path(config["docs_dir"])
    root = docs.resolve().parent
    seen = set()
    for f in list(files.documentation_pages()):
        page_dir = posixpath.dirname(f.src_uri)
        for m in _links(Path(f.abs_src_path).read_text(encoding="utf-8")):
            path = _outside(docs, page_dir, m.group(2))
            if path is None or not path.is_file() or path in seen:
                continue
            try:
                rel = path.relative_to(root).as_posix()
            except ValueError:
                continue
            seen.add(path)
            copy = File.generated(config, f"repo/{rel}", abs_src_path=str(path))
            if copy.is_documentation_page():  # a Markdown file of the repository: a page outside the nav
                copy.inclusion = InclusionLevel.NOT_IN_NAV
            files.append(copy)
    return files


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"])
    root = docs.resolve().parent
    page_dir = posixpath.dirname(page.file.src_uri)

    def fix(m: re.Match) -> str:
        path = _outside(docs, page_dir, m.group(2))
        if path is None:
            return m.group(0)
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            log.warning("%s links to %s, outside the repository", page.file.src_uri, m.group(2))
            return m.group(0)
        if not path.is_file():
            log.warning("%s links to %s, which is not a file of the repository",
                        page.file.src_uri, m.group(2))
            return m.group(0)
        new = posixpath.relpath(f"repo/{rel}", page_dir or ".")
        return f"{m.group(1)}{new}{m.group(3)}"

    # Leave code blocks alone: only prose links are rewritten.
    parts, last = [], 0
    for fence in FENCE.finditer(markdown):
        parts.append(LINK.sub(fix, markdown[last:fence.start()]))
        parts.append(fence.group(0))
        last = fence.end()
    parts.append(LINK.sub(fix, markdown[last:]))
    return "".join(parts)
