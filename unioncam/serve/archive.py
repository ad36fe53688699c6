"""``unioncam archive``: the TorchServe model archive (``.mar``) for the current settings.

The archive holds ``unioncam_handler.py`` (TorchServe's entry point: it re-exports
:mod:`unioncam.serve.torchserve.handler`), a copy of the installed ``unioncam`` package — TorchServe puts the model
folder first on the worker's path, so the worker runs the engine the archive was built with —
``index_to_name.json``, ``model-config.yaml`` and the weights (for ``random`` only the seed). Everything is
read from the installed package, so a wheel builds archives as well as a source checkout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..validation import validate_method, validate_precision, validate_theta

__all__ = ["ENTRY_POINT", "ArchiveSettings", "archived_yaml", "build_archive", "package_digest"]

#: The archive's handler file: TorchServe imports it by name from the model folder.
ENTRY_POINT = '''"""TorchServe's entry point of this archive: the handler lives in the archived unioncam package."""

from unioncam.serve.torchserve.handler import UnionCAMHandler, handle  # noqa: F401
'''

PACKAGE = Path(__file__).resolve().parent.parent


def _package_files(weights: bool = True) -> list[Path]:
    """The installed package's files (``weights=False``: without the shipped model weights)."""
    return sorted(p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix != ".pyc" and (weights or p.suffix not in (".pt", ".pth")))


def package_digest() -> str:
    """SHA-256 (first 16 hex digits) of the installed package's files: an archive built from other code differs."""
    h = hashlib.sha256()
    for p in _package_files():
        h.update(p.relative_to(PACKAGE).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class ArchiveSettings:
    """What goes into ``model-config.yaml``: TorchServe's batching and the engine's defaults."""

    #: A :data:`unioncam.models.MODELS` name (``vgg16``, ``shapes``, any torchvision classifier) or ``timm/<name>``.
    model: str = "vgg16"
    #: ``imagenet``, ``random`` (seeded by ``seed``) or a state dict's path; for ``shapes`` also ``shipped``.
    weights: str = "imagenet"
    seed: int = 0
    image_size: int = 224
    method: str = "unioncam"
    theta: float = 10.0
    layer: str | None = None
    batch_size: int | None = None  # masked inputs per forward; None: the engine's default for the device
    precision: str = "auto"  # dtype of the masked forwards; "auto" is resolved by each worker on its device
    #: ``cpu`` or ``cuda``: the machine the archive is made for, which decides the defaults below
    #: (``None``: ``cuda`` when this machine has a GPU). The worker still runs where TorchServe puts it
    #: (its ``gpu_id``); a ``cuda`` archive on a machine without a GPU runs on the CPU with GPU settings.
    device: str | None = None
    #: Requests TorchServe groups into one handler call. CPU default 1: a batch is answered all at once, so
    #: a slow explanation would hold up (and share a timeout with) whatever shares its batch. GPU default 8:
    #: explanation requests of one batch (same method and θ) share their masked forwards' chunks.
    max_batch_size: int | None = None
    #: Milliseconds TorchServe waits to fill a batch: CPU 50; GPU 10 (an explanation takes ~80 ms there).
    max_batch_delay_ms: int | None = None
    #: Seconds TorchServe waits for a batch; None: 5× the slowest method's estimate on ``device`` at
    #: ``image_size`` per request (:func:`unioncam.serve.limits.response_timeout`), at least 120.
    response_timeout_s: int | None = None
    #: Worker processes; on a CPU each gets an equal share of the cores. None: 2 on a CPU,
    #: ``gpus × workers_per_gpu`` on a GPU.
    workers: int | None = None
    #: GPU only: workers per GPU (TorchServe hands them ``gpu_id`` round-robin); default 2, one of them
    #: kept for predictions while the other explains.
    workers_per_gpu: int = 2
    #: GPU only: the GPUs to serve on; None: this machine's (at least 1).
    gpus: int | None = None
    #: Masked-forward explanations (UnionCAM, Score-CAM, Group-CAM) running at once. None: follow the
    #: live workers, ``live − 1`` (at least 1) across the model's workers on a CPU and per GPU on a GPU,
    #: so predictions and gradient explanations always find a worker; a number fixes it.
    explain_slots: int | None = None
    #: Seconds an explanation may wait for a slot; one whose estimated wait is longer gets 503 +
    #: Retry-After. None: 0 on a CPU (refused at once); on a GPU four batches' estimate, at least 2 s.
    explain_wait_s: float | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        gpu = self.device == "cuda"
        if self.max_batch_size is None:
            self.max_batch_size = 8 if gpu else 1
        if self.max_batch_delay_ms is None:
            self.max_batch_delay_ms = 10 if gpu else 50
        if gpu and self.gpus is None:
            import torch

            self.gpus = max(1, torch.cuda.device_count())
        if self.workers is None:
            self.workers = self.gpus * self.workers_per_gpu if gpu and isinstance(self.gpus, int) and \
                isinstance(self.workers_per_gpu, int) else 2

    @property
    def on_gpu(self) -> bool:
        """Whether the GPU settings are in force."""
        return self.device == "cuda"

    @property
    def explain_wait(self) -> float:
        """The explanation wait bound in force, in seconds."""
        if self.explain_wait_s is not None:
            return float(self.explain_wait_s)
        if not self.on_gpu:
            return 0.0
        from .limits import explanation_seconds

        cost = self.cost
        batch = self.max_batch_size * explanation_seconds("unioncam", self.image_size, "cuda", cost.gflops,
                                                          cost.channels, precision=self._gpu_precision)
        return round(max(2.0, 4 * batch), 1)

    @property
    def _gpu_precision(self) -> str:
        return "bf16" if self.precision == "auto" else self.precision

    @property
    def cost(self):
        """:class:`~unioncam.models.ModelCost` of one forward of the model at ``image_size``."""
        from ..models.cost import model_cost

        return model_cost(self.model, self.image_size, self.layer)

    @property
    def timeout(self) -> int:
        """The response timeout in force."""
        if self.response_timeout_s is not None:
            return self.response_timeout_s
        from .limits import response_timeout

        cost = self.cost
        return response_timeout(self.image_size, self.max_batch_size, self.device, gflops=cost.gflops,
                                channels=cost.channels, precision=self._gpu_precision)

    @property
    def slots(self) -> int:
        """The explanation slots in force when every archived worker runs (per GPU on a GPU)."""
        if self.explain_slots is not None:
            return self.explain_slots
        per = self.workers_per_gpu if self.on_gpu else self.workers
        return max(1, per - 1)

    @property
    def slots_text(self) -> str:
        """The slot rule in words, for start-up lines."""
        where = "per GPU" if self.on_gpu else "across the workers"
        if self.explain_slots is not None:
            rule = f"{self.explain_slots} {where} (fixed)"
        else:
            per = self.workers_per_gpu if self.on_gpu else self.workers
            rule = f"live workers − 1 {where} ({self.slots} with {per})"
        wait = self.explain_wait
        return rule + (f"; one more waits up to {wait:g} s, then 503 + Retry-After" if wait
                       else "; one more gets 503 + Retry-After")

    def yaml(self) -> str:
        """``model-config.yaml``'s text; it names the package's digest, so changed code reads as changed."""
        import yaml

        from .. import __version__

        cost = self.cost
        handler = {"model": self.model, "image_size": self.image_size, "method": self.method, "theta": self.theta,
                   "layer": self.layer, "batch_size": self.batch_size, "precision": self.precision,
                   "device": self.device, "explain_slots": self.explain_slots,
                   "explain_wait_s": self.explain_wait, "explained_layer": cost.layer, "channels": cost.channels,
                   "forward_gflops": round(cost.gflops, 3)}
        if self.weights == "random":
            handler.update(weights="random", seed=self.seed)
        else:
            handler.update(weights="file", weights_file=self.weights_file, source=str(self.weights))
        handler.update(engine=f"unioncam {__version__} ({package_digest()})")
        doc = {"minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.max_batch_size,
               "maxBatchDelay": self.max_batch_delay_ms, "responseTimeout": self.timeout,
               "handler": handler}
        return yaml.safe_dump(doc, sort_keys=False)

    @property
    def weights_label(self) -> str:
        """The weights as a user is shown them: ``random (seed 0)``, ``imagenet``, ``shipped`` or the path."""
        from ..models.defaults import weights_label

        return weights_label(self.weights, self.seed)

    @property
    def weights_file(self) -> str:
        """The name of the serialized weights inside the archive."""
        return f"{self.model.replace('/', '-')}.pth"  # timm/<name>: no folder inside the archive

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` for a setting the worker would refuse."""
        from ..models import is_known_model

        if not is_known_model(self.model):
            problem = (f"{self.model!r} is a user module; a TorchServe worker could not import it"
                       if ":" in str(self.model) else f"{self.model!r} is not a known model")
            raise InvalidInputError("model", problem, "vgg16, shapes, a torchvision classifier name "
                                    "(resnet50, vit_b_16, … : torchvision.models.list_models()) or timm/<name>")
        if self.model == "shapes" and self.weights == "imagenet":
            raise InvalidInputError("weights", "'imagenet' does not exist for the shapes CNN",
                                    "'shipped' (the weights in the package), 'random' or a state dict's path")
        if self.model != "shapes" and self.weights == "shipped":
            raise InvalidInputError("weights", f"'shipped' exists only for the shapes CNN, not {self.model}",
                                    "'imagenet', 'random' or a state dict's path")
        validate_method(self.method)
        validate_theta(self.theta)
        validate_precision(self.precision)
        if self.device not in ("cpu", "cuda"):
            raise InvalidInputError("device", f"{self.device!r}", "cpu or cuda")
        if self.explain_wait_s is not None and not (isinstance(self.explain_wait_s, (int, float))
                                                    and 0 <= self.explain_wait_s <= 3600):
            raise InvalidInputError("explain-wait", f"{self.explain_wait_s!r}", "seconds in [0, 3600]")
        for name in ("image_size", "batch_size", "max_batch_size", "max_batch_delay_ms", "workers",
                     "workers_per_gpu", "response_timeout_s", "explain_slots"):
            v = getattr(self, name)
            if name in ("batch_size", "response_timeout_s", "explain_slots") and v is None:
                continue
            low = 0 if name == "max_batch_delay_ms" else 1
            if not isinstance(v, int) or v < low:
                raise InvalidInputError(name.replace("_", "-").replace("-ms", ""), f"{v!r}", f"an integer ≥ {low}")
        self.cost  # noqa: B018 — a size the model cannot take (too small, or not a ViT's own) or an unknown layer


def _weights_file(settings: ArchiveSettings, dest: Path) -> list[str]:
    """Write the model's state dict for ``settings.weights`` (not ``random``) to ``dest``; return the
    class names of those weights."""
    import torch

    from ..models import load_model

    weights = None if settings.weights == "shipped" else settings.weights
    # A path is loaded too: a file that is not a state dict of this model is refused now, not in the worker.
    model = load_model(settings.model, weights)  # "imagenet": cached or downloaded; raises with instructions
    if weights is not None and weights != "imagenet" and Path(weights).is_file():
        shutil.copyfile(weights, dest)
    else:
        torch.save(model.state_dict(), dest)
    return list(model.categories)


def build_archive(settings: ArchiveSettings, model_store: str | Path = "model_store", name: str = "unioncam",
                  force: bool = False) -> Path:
    """Build ``<model_store>/<name>.mar`` and return its path (kept as is when present and not ``force``)."""
    settings.validate()
    store = Path(model_store)
    store.mkdir(parents=True, exist_ok=True)
    mar = store / f"{name}.mar"
    if mar.exists() and not force:
        return mar
    with tempfile.TemporaryDirectory(prefix="unioncam-archive-") as tmp:
        stage = Path(tmp)
        # --extra-files copies a folder's *contents* into the archive root: "files/unioncam" → "unioncam/".
        files = stage / "files"
        for p in _package_files(weights=False):  # VGG16's weights go in as the serialized file
            dest = files / "unioncam" / p.relative_to(PACKAGE)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        (stage / "unioncam_handler.py").write_text(ENTRY_POINT)
        (stage / "model-config.yaml").write_text(settings.yaml())
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1.0",
               "--handler", str(stage / "unioncam_handler.py"), "--config-file", str(stage / "model-config.yaml"),
               "--export-path", str(store), "--force"]
        categories = list(settings.cost.categories)  # the default weights' classes
        if settings.weights != "random":
            weights = stage / settings.weights_file
            categories = _weights_file(settings, weights)  # a user's file may have other classes
            cmd += ["--serialized-file", str(weights)]
        (files / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(categories)}))
        cmd += ["--extra-files", str(files)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not mar.exists():
            raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return mar


def archived_yaml(mar: Path) -> str | None:
    """The ``model-config.yaml`` inside an archive (``None`` if there is no readable archive)."""
    try:
        with zipfile.ZipFile(mar) as z:
            return z.read("model-config.yaml").decode()
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
