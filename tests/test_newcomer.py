"""What a newcomer meets on the first try: examples that say which python runs them and write only into
git-ignored folders, upload mistakes named for what they are, and the docs' raw-upload rule."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .test_docs import blocks

ROOT = Path(__file__).resolve().parents[1]
FIRST_PAGES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md", ROOT / "docs" / "api.md"]
OUTPUT = re.compile(r"""(?:\s-o\s+|\.save\(\s*["'])([^\s"')]+)""")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("page", FIRST_PAGES, ids=lambda p: p.name)
def test_first_examples_write_only_into_ignored_folders(page):
    outputs = [(b.where, m.group(1)) for b in blocks(page) for m in OUTPUT.finditer(b.code)]
    assert outputs or page.name == "api.md"
    for where, path in outputs:
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert r.returncode == 0, f"{where} writes {path}, which git does not ignore (use out/)"


def test_the_readme_python_example_says_which_python_runs_it():
    text = (ROOT / "README.md").read_text("utf-8")
    before = text[:text.index("```python")].rstrip().rsplit("\n\n", 1)[-1]
    assert ".venv/bin/python" in before and "source scripts/bootstrap.sh" in before


def test_a_text_file_sent_as_the_image_is_called_text_not_an_image():
    from unioncam import InvalidInputError
    from unioncam.serve.protocol import Defaults, parse

    with pytest.raises(InvalidInputError) as err:  # a text/plain form part reaches the handler as text
        parse({"image": "name,score\nalice,3\nbob,4\n"}, True, Defaults(image_size=64))
    msg = str(err.value)
    assert err.value.field == "image" and "is text, not an image" in msg and "'name,score alice,3" in msg
    assert "PNG, JPEG" in msg


def test_the_serving_docs_say_which_content_types_a_raw_upload_needs():
    text = " ".join((ROOT / "docs" / "serving.md").read_text("utf-8").split())
    para = text[text.index("A raw body (the image file itself)"):][:700]
    for needed in ("application/octet-stream", "image/png", "curl -T FILE", "--data-binary",
                   "application/x-www-form-urlencoded", "500 ErrorDataDecoderException"):
        assert needed in para, needed
