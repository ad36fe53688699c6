"""``unioncam archive --kserve DIR``: the storage layout KServe's TorchServe runtime reads.

KServe downloads the InferenceService's ``storageUri`` to ``/mnt/models`` and starts
``torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties``
next to its own wrapper (port 8080), which forwards each v1/v2 request to TorchServe's inference
address (``:8085``). The layout is therefore::

    DIR/config/config.properties   TorchServe settings + ``model_snapshot`` (which .mar, how many workers)
    DIR/model-store/<name>.mar     the archive of :func:`unioncam.serve.archive.build_archive`

The properties keep this project's settings (size limits, Prometheus metrics, no model API) with two
deliberate differences from ``unioncam/serve/config.properties``, both because the only client of
TorchServe in the pod is KServe's wrapper:

* token authorization is **off**: the wrapper forwards requests without TorchServe's key (the key
  would live in a file inside the pod and expire every hour). Access control belongs to KServe's
  ingress (Istio/Knative policies); TorchServe's inference and management addresses stay on
  ``127.0.0.1`` so nothing outside the pod reaches the unauthenticated API.
* metrics listen on ``0.0.0.0:8082`` so Prometheus can scrape the pod (the metrics API needs no token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .archive import ArchiveSettings, build_archive
from .server import set_properties, template

__all__ = ["KSERVE_MODEL_STORE", "KServeLayout", "kserve_config", "write_kserve_layout"]

#: Where KServe's storage initializer puts the model folder, and so the model store inside the pod.
KSERVE_MODEL_STORE = "/mnt/models/model-store"


@dataclass
class KServeLayout:
    root: Path
    config: Path
    model_store: Path
    mar: Path


def kserve_config(settings: ArchiveSettings, name: str = "unioncam", model_store: str = KSERVE_MODEL_STORE,
                  max_request_mb: int = 16, max_response_mb: int = 16) -> str:
    """``config.properties`` for KServe's TorchServe runtime serving ``<name>.mar`` with ``settings``."""
    mb = 1024 * 1024
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {name: {"1.0": {
            "defaultVersion": True, "marName": f"{name}.mar",
            "minWorkers": settings.workers, "maxWorkers": settings.workers,
            "batchSize": settings.max_batch_size, "maxBatchDelay": settings.max_batch_delay_ms,
            "responseTimeout": settings.timeout,
        }}},
    }
    # The project's template (size limits, metrics, model API off, ...) without its comments, which speak
    # of the local server, and with the runtime's addresses and layout.
    header = (
        "# TorchServe inside a KServe predictor pod (written by `unioncam archive --kserve`).\n"
        "# KServe's wrapper listens on 8080 and forwards v1/v2 requests to TorchServe on 127.0.0.1:8085. It is\n"
        "# TorchServe's only client and sends no TorchServe key: authorization is KServe's ingress's job, and\n"
        "# the API listens on 127.0.0.1 only. Prometheus scrapes the pod's port 8082 (the metrics API has no\n"
        "# token). TS_<PROPERTY> environment variables override these lines. The image has every dependency:\n"
        "# nothing is pip-installed when the model loads.\n"
    )
    text = header + "".join(line + "\n" for line in template().splitlines() if not line.startswith("#"))
    return set_properties(text, {
        "inference_address": "http://127.0.0.1:8085",
        "management_address": "http://127.0.0.1:8085",
        "metrics_address": "http://0.0.0.0:8082",
        "grpc_inference_port": 7070,
        "grpc_management_port": 7071,
        "enable_envvars_config": "true",
        "install_py_dep_per_model": "false",
        "disable_token_authorization": "true",
        "max_request_size": max_request_mb * mb,
        "max_response_size": max_response_mb * mb,
        "number_of_netty_threads": 4,
        "job_queue_size": 100,
        "model_store": model_store,
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
    })


def write_kserve_layout(settings: ArchiveSettings, root: str | Path, name: str = "unioncam") -> KServeLayout:
    """Write ``root/config/config.properties`` and ``root/model-store/<name>.mar`` (rebuilt) for ``settings``.

    Anything else in ``root/model-store`` that ends in ``.mar`` is refused rather than deleted: KServe's
    wrapper serves exactly one archive per storage folder.
    """
    settings.validate()
    root = Path(root)
    store = root / "model-store"
    others = sorted(p.name for p in store.glob("*.mar") if p.name != f"{name}.mar") if store.is_dir() else []
    if others:
        raise FileExistsError(f"{store} already holds {', '.join(others)}: KServe serves one archive per "
                              "storage folder; use an empty --kserve folder")
    mar = build_archive(settings, store, name, force=True)
    config = root / "config" / "config.properties"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(kserve_config(settings, name))
    return KServeLayout(root=root, config=config, model_store=store, mar=mar)
