"""``unioncam archive --kserve DIR``: the model folder KServe's native runtime loads from ``/mnt/models``.

KServe's storage initializer copies the InferenceService's ``storageUri`` to ``/mnt/models``; the image's
entry point (``deploy/kserve/install-and-start.sh``) runs ``unioncam serve --backend kserve --model-dir
/mnt/models``. The folder holds what a ``.mar`` holds apart from code (the image has the engine)::

    DIR/model-config.yaml     the archive's settings (model, image size, method, θ, slots, …)
    DIR/index_to_name.json    the class names of the weights
    DIR/<model>.pth           the weights (none for ``--weights random``: the seed is in the settings)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..archive import ArchiveSettings, _weights_file

__all__ = ["CONFIG", "KServeLayout", "MODEL_DIR", "read_layout", "write_layout"]

#: Where KServe's storage initializer puts the model folder inside the pod.
MODEL_DIR = "/mnt/models"
#: The settings file of a model folder (the same text as the archive's ``model-config.yaml``).
CONFIG = "model-config.yaml"


@dataclass
class KServeLayout:
    root: Path
    files: list[Path] = field(default_factory=list)


def write_layout(settings: ArchiveSettings, root: str | Path) -> KServeLayout:
    """Write ``settings``' model folder under ``root`` (created; files of an earlier layout replaced).

    A folder holding anything else is refused rather than mixed: KServe serves the whole folder.
    """
    settings.validate()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ours = {CONFIG, "index_to_name.json", settings.weights_file}
    others = sorted(p.name for p in root.iterdir() if p.name not in ours and not p.name.endswith((".pth", ".pt")))
    if others:
        raise FileExistsError(f"{root} already holds {', '.join(others)}: KServe loads the whole folder; "
                              "use an empty --kserve folder")
    for old in root.glob("*.pt*"):
        old.unlink()
    files = []
    categories = list(settings.cost.categories)
    if settings.weights != "random":
        weights = root / settings.weights_file
        categories = _weights_file(settings, weights)
        files.append(weights)
    names = root / "index_to_name.json"
    names.write_text(json.dumps({str(i): c for i, c in enumerate(categories)}))
    config = root / CONFIG
    config.write_text(settings.yaml())
    return KServeLayout(root=root, files=[config, names, *files])


def read_layout(root: str | Path) -> dict:
    """A model folder's settings (``model-config.yaml`` as a dict); raises naming the folder if it has none."""
    path = Path(root) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the model folder is written by `unioncam archive "
                                f"--kserve DIR` (and on a cluster copied to {MODEL_DIR} from the storageUri)")
    return yaml.safe_load(path.read_text()) or {}
