"""The documentation: a strict MkDocs build, the API reference's coverage, and every example run.

Examples are the fenced ```python and ```bash (also ```sh, ```shell) blocks of README.md and docs/*.md
(every page, found by glob). A block preceded by a line ``<!-- not-run: REASON -->`` is not run; every
such mark must give a reason, and the test reports how many blocks were run and skipped. The others run
per page, from a scratch copy of the repository root (symlinks, so the examples' outputs stay out of the
checkout): the page's shell blocks in order in one ``bash`` (``set -eo pipefail``), then its Python
blocks in order in one fresh interpreter. Shell blocks that call ``127.0.0.1:8080`` (inference),
``:8081`` (management) or ``:8082`` (metrics) are pointed at one ``unioncam serve`` started for the
session (the trained shapes CNN at 64², one worker) on free ports, whose run folder is the scratch
folder's ``runs/current``. A page whose examples need a server of their own (plain ``torchserve
--start``) says ``<!-- examples-run-by: tests/test_NAME.py -->`` on a line of its own: that test runs them,
and this one only checks that it exists and reads the page.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import unioncam

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NOT_RUN = re.compile(r"^<!--\s*not-run:(.*?)-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
OWN_RUNNER = re.compile(r"^<!--\s*examples-run-by:\s*(\S+)\s*-->\s*$", re.M)
ADDRESS = re.compile(r"\b(127\.0\.0\.1|localhost):(8080|8081|8082)\b")
# Repository entries the scratch folder does not link (outputs of the examples, builds, the venv).
NOT_LINKED = {"out", "runs", "model_store", "site", "eval-out", "figure.png", ".venv", ".git"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str  # "python" or "bash"
    code: str
    skip: str | None  # the not-run reason, or None when the block runs

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's python and shell blocks, in order, with their not-run reasons."""
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i, previous = 0, ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        if lang in LANGS:
            mark = NOT_RUN.match(previous)
            skip = mark.group(1).strip() if mark else None
            out.append(Block(page, start + 1, LANGS[lang], "\n".join(body) + "\n", skip))
        previous = ""
    return out


def own_runner(page: Path) -> str | None:
    """The test file that runs ``page``'s examples itself, if the page names one."""
    m = OWN_RUNNER.search(page.read_text(encoding="utf-8"))
    return m.group(1) if m else None


ALL = [b for p in PAGES for b in blocks(p)]
RUN_PAGES = [p for p in PAGES if own_runner(p) is None and any(b.skip is None for b in blocks(p))]


# ------------------------------------------------------------------------------------------- build


def test_docs_build_strict_and_cover_the_api(tmp_path):
    """`mkdocs build --strict`: no warning (broken links or anchors, pages missing from the nav, docstrings
    that do not parse), and the API page documents every public name of unioncam.__all__."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in unioncam.__all__ if f'id="unioncam.{name}"' not in api]
    assert not missing, f"docs/api.md does not document {missing}"
    for page in PAGES[1:]:
        assert (site / (page.stem if page.stem != "index" else "") / "index.html").is_file(), page
    # The site loads nothing from the network (no web fonts, no CDN): it builds and reads offline.
    resource = re.compile(r'<(?:link|script)[^>]*(?:href|src)="(https?://[^"]*)"')
    external = {m for html in site.rglob("*.html") for m in resource.findall(html.read_text("utf-8"))}
    assert not external, f"pages load {sorted(external)}"
    # README.md is not part of the site: its links are checked here (files, and anchors into the pages).
    broken = []
    link = re.compile(r"\]\(([^)\s#]*)(?:#([^)\s]*))?\)")
    for target, anchor in link.findall((ROOT / "README.md").read_text("utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        path = ROOT / target if target else ROOT / "README.md"
        if not path.exists():
            broken.append(target)
        elif anchor and path.parent == ROOT / "docs" and path.suffix == ".md":
            html = site / ("" if path.stem == "index" else path.stem) / "index.html"
            if f'id="{anchor}"' not in html.read_text("utf-8"):
                broken.append(f"{target}#{anchor}")
    assert not broken, f"README.md links to {broken}"


def test_docs_examples_are_run_or_say_why_not():
    """Every example block runs, or carries `<!-- not-run: REASON -->` with a reason."""
    skipped = [b for b in ALL if b.skip is not None]
    no_reason = [b.where for b in skipped if not b.skip]
    assert not no_reason, f"not-run marks without a reason: {no_reason}"
    run = len(ALL) - len(skipped)
    assert run > 0
    for page in PAGES:  # a page run by a test of its own: that test exists and reads this page
        runner = own_runner(page)
        if runner is not None:
            assert (ROOT / runner).is_file(), f"{page.name} names {runner}, which does not exist"
            assert page.name in (ROOT / runner).read_text("utf-8"), f"{runner} does not read {page.name}"
    summary = "; ".join(f"{b.where} ({b.skip})" for b in skipped)
    warnings.warn(f"docs examples: {run} blocks run, {len(skipped)} not run: {summary}", stacklevel=1)


# ---------------------------------------------------------------------------------------- examples


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    # `source scripts/bootstrap.sh` in an example finds this environment instead of making a new one.
    return {**os.environ, "PATH": path, "TRITON_INTERPRET": "1", "MPLBACKEND": "Agg",
            "NO_MKDOCS_2_WARNING": "1", "UNIONCAM_VENV": sys.prefix}


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    """A stand-in for the repository root: its entries linked, the examples' outputs kept apart."""
    root = tmp_path_factory.mktemp("docs-examples")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED and not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    return root


@dataclass
class DocsServer:
    proc: subprocess.Popen
    ports: dict[str, int]
    lines: list[str]


@pytest.fixture(scope="session")
def docs_server(scratch):
    """One `unioncam serve` for every page's curl examples: shapes CNN, 64², one worker, free ports."""
    from unioncam.serve.torchserve.server import Ports, config_text

    ports = Ports.free()
    config = scratch / "docs-server.properties"
    config.write_text(config_text(ports))
    cmd = [sys.executable, "-m", "unioncam", "serve", "--model", "shapes", "--image-size", "64",
           "--workers", "1", "--config", str(config), "--runs", "runs", "--model-store", "model_store"]
    proc = subprocess.Popen(cmd, cwd=scratch, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops the server"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not ready.wait(1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("unioncam serve did not start:\n" + "".join(lines[-40:]))
    try:
        by_default = {"8080": ports.inference, "8081": ports.management, "8082": ports.metrics}
        yield DocsServer(proc, by_default, lines)
    finally:
        proc.send_signal(signal.SIGTERM)  # unioncam serve stops TorchServe and its workers
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _script(blocks_: list[Block], header: str, comment: str) -> str:
    parts = [header]
    for b in blocks_:
        parts.append(f"{comment} ---- {b.where}\n{b.code}")
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_examples_run(page, scratch, request):
    todo = [b for b in blocks(page) if b.skip is None]
    shell = [b for b in todo if b.lang == "bash"]
    python = [b for b in todo if b.lang == "python"]
    if shell:
        if any(ADDRESS.search(b.code) for b in shell):
            server = request.getfixturevalue("docs_server")
            shell = [Block(b.page, b.line, b.lang,
                           ADDRESS.sub(lambda m: f"127.0.0.1:{server.ports[m.group(2)]}", b.code), None)
                     for b in shell]
        r = subprocess.run(["bash", "-c", _script(shell, "set -eo pipefail", "#")], cwd=scratch, env=_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, \
            f"shell examples of {page.name} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if python:
        script = scratch / f".examples-{page.stem}.py"
        script.write_text(_script(python, "", "#"))
        r = subprocess.run([sys.executable, str(script)], cwd=scratch, env=_env(), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, \
            f"Python examples of {page.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

