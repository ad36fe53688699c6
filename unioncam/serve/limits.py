"""How long an explanation takes, and how many may run at once: the server's timeouts and admission.

TorchServe gives every batch one response timeout and answers a batch all at once, so a slow explanation
sharing a batch delays (and can time out) its neighbours. The archive therefore serves one request per
batch with several workers, sizes the timeout from the slowest method at the archive's image size, and
the handler lets at most ``explain_slots`` explanations run at once across the workers: one more gets
``503`` with ``Retry-After`` at once instead of queueing behind them, and predictions always find a worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Slots", "explanation_seconds", "masked_forwards", "response_timeout"]

#: One VGG16 forward at 224²: 30.9 GFLOP (torch's flop counter, :func:`unioncam.models.model_cost`).
VGG16_GFLOPS_224 = 30.94

#: CPU seconds of one forward per image: a fixed part plus a part per GFLOP, from VGG16 fp32 on 2 cores of
#: an Intel Xeon (0.28 s at 224², 0.023–0.03 s at 64²). Other models are assumed to run at VGG16's rate
#: per GFLOP; depthwise convolutions (EfficientNet, MobileNet) and attention run below it, which the
#: 5× margin of :func:`response_timeout` absorbs.
CPU_FIXED_S, CPU_S_PER_GFLOP = 0.005, 0.28 / VGG16_GFLOPS_224

#: A forward on CUDA is assumed 20× faster than on this CPU: an assumption, not a measurement.
CUDA_SPEEDUP = 20


def masked_forwards(method: str, channels: int = 512) -> int:
    """Masked forwards of one explanation at most: UnionCAM scores every channel plus its three β's and the
    black image, Score-CAM every channel plus the black image, Group-CAM 32 groups and the blur; a
    gradient method costs about three forwards' worth (its forward and backward)."""
    from ..methods.groupcam import GROUPCAM_GROUPS

    return {"unioncam": channels + 4, "scorecam": channels + 1, "groupcam": GROUPCAM_GROUPS + 2}.get(method, 3)


def explanation_seconds(method: str, image_size: int, device: str = "cpu", gflops: float | None = None,
                        channels: int = 512, targets: int = 1) -> float:
    """A rough upper estimate of one request's seconds: ``targets`` explanations of ``method``.

    ``gflops``: one forward of the served model at ``image_size`` (``None``: VGG16's, scaled by the pixels);
    ``channels``: its explained layer's.
    """
    if gflops is None:
        gflops = VGG16_GFLOPS_224 * (image_size / 224) ** 2
    per_forward = CPU_FIXED_S + CPU_S_PER_GFLOP * gflops
    if device.startswith("cuda"):
        per_forward /= CUDA_SPEEDUP
    return targets * masked_forwards(method, channels) * per_forward


def response_timeout(image_size: int, batch_size: int = 1, device: str = "cpu", floor_s: int = 120,
                     gflops: float | None = None, channels: int = 512) -> int:
    """TorchServe's ``responseTimeout`` for a batch: 5× the slowest method's estimate per request (a worker
    has a share of the cores, and shares them with the others), at least ``floor_s``."""
    slowest = max(explanation_seconds(m, image_size, device, gflops, channels)
                  for m in ("unioncam", "scorecam", "groupcam"))
    return max(floor_s, math.ceil(5 * slowest * batch_size))


class Slots:
    """At most ``n`` holders at once across processes (the model's workers), by ``flock`` on ``n`` files.

    ``key`` names the pool (the model's folder, shared by its workers). ``n`` of ``None`` or 0: no limit.
    """

    def __init__(self, key: str, n: int | None) -> None:
        self.n = n or 0
        folder = Path(tempfile.gettempdir()) / f"unioncam-slots-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        self.paths = [folder / f"slot-{i}" for i in range(self.n)]
        if self.paths:
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[bool]:
        """Yields ``True`` holding a free slot (released on exit), ``False`` when all are taken."""
        if not self.paths:
            yield True
            return
        for path in self.paths:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        yield False
