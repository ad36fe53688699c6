"""Every Kubernetes manifest under ``deploy/`` against KServe's full CRD schemas, and what a schema cannot see.

The schemas are KServe v0.20.0's ``config/crd/full/serving.kserve.io_*.yaml`` (vendored, without descriptions,
by ``scripts/vendor_kserve_crds.py`` into ``tests/crds/``). A field the schema does not name is an error, as
the API server's pruning would drop it silently. Beyond the schema: timeouts within Knative's default
``max-revision-timeout-seconds`` (600), non-root containers, probes on routes the server serves, Prometheus
annotations that act, and image references that parse.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "tests" / "crds" / "kserve-v0.20.0.json.gz"
#: Knative Serving's default max-revision-timeout-seconds: a longer predictor timeout is refused.
KNATIVE_MAX_TIMEOUT_S = 600
#: The routes KServe's model server (and so the image) serves without a request body: probes may use these.
PROBE_ROUTES = {"/v2/health/live", "/v2/health/ready", "/v1/models", "/metrics"}

# A Docker image reference (github.com/distribution/reference): [host[:port]/]path[:tag][@digest], the path
# lowercase. As Docker normalises it, the first component is a host only if it has a "." or ":" or is
# "localhost"; otherwise it is part of the path (docker.io/<path>), so "REGISTRY/x" is an uppercase path.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{{32,}})?$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?$")


def image_ref_ok(ref: str) -> bool:
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return bool(_HOST.match(first) and _PATH.match(rest))
    return bool(_PATH.match(ref))

def _closed(schema):
    """The schema with unknown fields refused: ``additionalProperties: false`` on every object that lists its
    properties and does not keep unknown fields (``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def schemas():
    doc = json.loads(gzip.decompress(CRDS.read_bytes()))
    assert doc["release"] == "v0.20.0"
    return {kind: {v: _closed(s) for v, s in spec["versions"].items()} for kind, spec in doc["kinds"].items()}


def _manifests() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted((ROOT / "deploy").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


MANIFESTS = _manifests()
IDS = [f"{p.relative_to(ROOT)}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for p, d in MANIFESTS]


def test_there_are_manifests_of_every_kind_we_ship():
    kinds = {d["kind"] for _, d in MANIFESTS}
    assert {"ServingRuntime", "InferenceService"} <= kinds, kinds


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=IDS)
def test_each_manifest_fits_the_crd_schema(schemas, path, doc):
    group, _, version = doc["apiVersion"].partition("/")
    assert group == "serving.kserve.io", f"{path}: {doc['apiVersion']} is not a KServe kind"
    schema = schemas[doc["kind"]][version]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{path}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_schema_check_refuses_unknown_and_wrong_fields(schemas):
    """The check itself: a misspelt field, a field of the wrong type, an unknown container key all fail."""
    (_, isvc), = [(p, d) for p, d in MANIFESTS if d["kind"] == "InferenceService"][:1]
    schema = schemas["InferenceService"]["v1beta1"]
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["timeoutSeconds"] = 600  # the field is "timeout"
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["timeout"] = "600s"
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)
    (_, runtime), = [(p, d) for p, d in MANIFESTS if d["kind"] == "ServingRuntime"][:1]
    bad = copy.deepcopy(runtime)
    bad["spec"]["containers"][0]["readinessProbes"] = bad["spec"]["containers"][0]["readinessProbe"]
    assert not jsonschema.Draft7Validator(schemas["ServingRuntime"]["v1alpha1"]).is_valid(bad)


def _components(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    return [spec[c] for c in ("predictor", "transformer", "explainer") if c in spec]


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
        return list(doc["spec"].get("containers", []))
    out = []
    for comp in _components(doc):
        out += comp.get("containers", [])
        for key in ("model", "pytorch", "sklearn"):
            if key in comp:
                out.append(comp[key])
    return out


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=IDS)
def test_timeouts_within_knatives_default(path, doc):
    for comp in _components(doc):
        if "timeout" in comp:
            assert 0 < comp["timeout"] <= KNATIVE_MAX_TIMEOUT_S, f"{path}: timeout {comp['timeout']} > 600"


def _runtimes() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in MANIFESTS if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")}


def test_runtime_containers_run_as_a_numeric_non_root_user_without_capabilities():
    assert _runtimes()
    for name, runtime in _runtimes().items():
        for c in runtime["spec"]["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, name
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, name
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), name
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), name
    dockerfile = (ROOT / "deploy" / "kserve" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), users  # numeric, not root


@pytest.mark.parametrize("path,doc", [m for m in MANIFESTS if m[1]["kind"] == "InferenceService"],
                         ids=[i for i, m in zip(IDS, MANIFESTS) if m[1]["kind"] == "InferenceService"])
def test_services_name_a_shipped_runtime_and_do_not_loosen_it(path, doc):
    model = doc["spec"]["predictor"]["model"]
    runtime = _runtimes().get(model.get("runtime"))
    assert runtime is not None, f"{path}: runtime {model.get('runtime')!r} is not under deploy/"
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model.get("protocolVersion", "v1") in runtime["spec"]["protocolVersions"]
    assert "securityContext" not in model or model["securityContext"].get("runAsNonRoot") is True
    annotations = doc["metadata"].get("annotations", {})
    assert annotations.get("serving.kserve.io/enable-prometheus-scraping") == "true", path


def test_prometheus_annotations_act_and_point_at_the_metrics_route():
    for name, runtime in _runtimes().items():
        ann = runtime["spec"].get("annotations", {})
        if any(k.startswith("prometheus.kserve.io/") for k in ann):
            assert ann.get("serving.kserve.io/enable-prometheus-scraping") == "true", name
            assert ann.get("prometheus.kserve.io/path") == "/metrics", name
            ports = {p["containerPort"] for c in runtime["spec"]["containers"] for p in c.get("ports", [])}
            assert int(ann["prometheus.kserve.io/port"]) in ports, name


def probes() -> list[tuple[str, str, int]]:
    """Every HTTP probe of the runtimes: (runtime, path, port)."""
    out = []
    for name, runtime in _runtimes().items():
        for c in runtime["spec"]["containers"]:
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                get = c.get(kind, {}).get("httpGet")
                if get:
                    out.append((name, get["path"], int(get["port"])))
    return out


def test_probes_use_served_routes_on_the_container_port():
    """The routes are checked against the running server in tests/test_deploy.py; here: names and ports."""
    assert probes()
    for name, path, port in probes():
        assert path in PROBE_ROUTES, (name, path)
        ports = {p["containerPort"] for c in _runtimes()[name]["spec"]["containers"] for p in c.get("ports", [])}
        assert port in ports, (name, port)


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=IDS)
def test_image_references_parse(path, doc):
    for c in _containers(doc):
        if "image" in c:
            assert image_ref_ok(c["image"]), f"{path}: image {c['image']!r} is not a valid reference"


@pytest.mark.parametrize("ref,ok", [
    ("registry.example.com/unioncam/unioncam-kserve:0.1.0", True),
    ("localhost:5000/a/b@sha256:" + "a" * 64, True),
    ("python:3.12-slim", True),
    ("REGISTRY/unioncam-torchserve:0.1.0", False),  # uppercase repository
    ("registry.example.com/unioncam:", False),
    ("registry.example.com//x", False),
])
def test_the_image_reference_check(ref, ok):
    assert image_ref_ok(ref) is ok
