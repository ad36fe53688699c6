"""Vendors KServe's full CRD schemas for tests/test_manifests.py: the ``openAPIV3Schema`` of each served version,
without descriptions (they do not validate anything), as gzipped JSON.

    python scripts/vendor_kserve_crds.py v0.20.0 serving.kserve.io_inferenceservices.yaml \\
        serving.kserve.io_servingruntimes.yaml serving.kserve.io_clusterservingruntimes.yaml

The YAML files are ``config/crd/full/`` of that KServe release (github.com/kserve/kserve, tag ``v0.20.0``);
the output is ``tests/crds/kserve-<release>.json.gz``.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(release: str, *files: str) -> None:
    kinds: dict[str, dict] = {}
    for file in files:
        crd = yaml.safe_load(Path(file).read_text())
        spec = crd["spec"]
        kinds[spec["names"]["kind"]] = {
            "group": spec["group"],
            "versions": {v["name"]: _strip(v["schema"]["openAPIV3Schema"]) for v in spec["versions"] if v.get("served")},
            "source": f"github.com/kserve/kserve {release} config/crd/full/{Path(file).name}",
        }
    out = ROOT / "tests" / "crds" / f"kserve-{release}.json.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"release": release, "kinds": kinds}
    out.write_bytes(gzip.compress(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), mtime=0))
    print(out, f"{out.stat().st_size / 1e3:.0f} kB", ", ".join(sorted(kinds)))


if __name__ == "__main__":
    main(*sys.argv[1:])
