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

__all__ = ["Slots", "explanation_seconds", "response_timeout"]

#: Masked forwards per image of each method for VGG16's ``features.29`` (512 channels) at most: UnionCAM
#: scores every channel plus its three β's, Score-CAM every channel, Group-CAM 32 groups and the blur.
FORWARDS = {"unioncam": 512 + 4, "scorecam": 512 + 1, "groupcam": 32 + 2}

#: CPU seconds of one VGG16 forward per image: a fixed part plus a part that grows with the pixels
#: (fp32 on 2 cores of an Intel Xeon: 0.28 s at 224², 0.023–0.03 s at 64²).
CPU_FIXED_S, CPU_PER_224_S = 0.005, 0.28


def explanation_seconds(method: str, image_size: int, device: str = "cpu") -> float:
    """A rough upper estimate of one explanation's seconds (the gradient methods cost about two forwards).

    Measured on the CPU only; on CUDA it assumes a forward is 20× faster — an assumption, not a measurement.
    """
    per_forward = CPU_FIXED_S + CPU_PER_224_S * (image_size / 224) ** 2
    if device.startswith("cuda"):
        per_forward /= 20
    return FORWARDS.get(method, 3) * per_forward


def response_timeout(image_size: int, batch_size: int = 1, device: str = "cpu", floor_s: int = 120) -> int:
    """TorchServe's ``responseTimeout`` for a batch: 5× the slowest method's estimate per request (a worker
    has a share of the cores, and shares them with the others), at least ``floor_s``."""
    slowest = max(explanation_seconds(m, image_size, device) for m in FORWARDS)
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
