"""Writes docs/cli.md, the command-line reference, from the parser itself:

    python scripts/cli_reference.py            # after changing an option or its help
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unioncam.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent

INTRO = """# Command-line reference

`unioncam COMMAND [options]`; `unioncam COMMAND --help` prints the same. Install the project with
`./serve.sh` or `./test.sh` (they create `.venv/`), then `source scripts/bootstrap.sh` puts `unioncam` on
`PATH`. This page is generated from the parser by `python scripts/cli_reference.py`.

## The same names everywhere

* `--model NAME` and `--weights W` mean the same in `explain`, `figure`, `evaluate`, `archive` and `serve`,
  and so does leaving them out: ImageNet VGG16 when its weights are in the torch hub cache, else the trained
  shapes CNN that ships in the package (a note on stderr says so). `--model` alone gives that model's
  trained weights (`imagenet`, downloaded if missing; `shipped` for shapes); random weights only with
  `--weights random`, and then a warning says their maps mean nothing.
* `--weights-seed N` is the seed of `--weights random` in every command (`--seed` is its old spelling in
  `explain`, `archive` and `serve`). In `evaluate`, `--sample-seed` is the seed of the `--limit`
  sample (`--seed` is its old spelling there).
* `--image-size N` (alias `--size`) is the side images are resized to; left out, the model's own (64 for
  shapes, 224 for the others).
* `--target` takes one class or a comma-separated list (`--target 281,285`), as the API and the server do.
* A mistake (a bad value, a missing file, an image too small for the model, no server to talk to) is one
  line `unioncam COMMAND: error: …` on stderr and exit status 2, never a traceback; Ctrl-C is status 130.

```bash
source scripts/bootstrap.sh
unioncam explain samples/shapes/cross.png --method gradcam,unioncam --out out
unioncam figure --shapes 2 --method gradcam,layercam --out out/figure.png -q
unioncam token --runs out/no-runs || echo "exit status $?"
```
"""


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}" + (" …`" if action.nargs in ("+", "*") else "`")
    if action.nargs == 0:
        return ", ".join(f"`{o}`" for o in action.option_strings)
    meta = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices and
                              len(action.choices) <= 8 else action.dest.upper())
    return ", ".join(f"`{o} {meta}`" for o in action.option_strings)


def reference() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = [INTRO]
    for name, p in sub.choices.items():
        out.append(f"## unioncam {name}\n")
        summary = (helps.get(name) or "").strip().rstrip(".")
        if summary:
            out.append(f"{summary[0].upper()}{summary[1:]}.")
        if p.formatter_class is argparse.RawDescriptionHelpFormatter:  # a laid-out text: see --help
            out.append(f"Its input layout and the many-process mode are in `unioncam {name} --help`.")
        elif p.description:
            out.append(" ".join(p.description.split()))
        out.append("")
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out.append(f"* {_flags(action)}: {' '.join((action.help or '').split())}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(reference())
    print(ROOT / "docs" / "cli.md")
