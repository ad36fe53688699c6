"""How long an explanation takes, and how many may run at once: the server's timeouts and admission.

TorchServe gives every batch one response timeout and answers a batch all at once, so a slow explanation
sharing a batch delays (and can time out) its neighbours. On a CPU the archive therefore serves one
request per batch with several workers, sizes the timeout from the slowest method at the archive's image
size, and the handler lets at most ``live workers − 1`` explanations with masked forwards run at once
across the workers (:class:`Slots`, counted from the workers actually running): one more gets ``503``
with ``Retry-After`` at once instead of queueing behind them, and predictions always find a worker.

On a GPU an explanation takes a tenth of a second, not minutes: the same count holds per GPU, but an
explanation that finds every slot taken waits for one (``wait_s``) and is refused only when the
estimated wait exceeds that bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Slots", "WorkerLease", "explanation_seconds", "masked_forwards", "response_timeout"]

#: One VGG16 forward at 224²: 30.9 GFLOP (torch's flop counter, :func:`unioncam.models.model_cost`).
VGG16_GFLOPS_224 = 30.94

#: CPU seconds of one forward per image: a fixed part plus a part per GFLOP, from VGG16 fp32 on 2 cores of
#: an Intel Xeon (0.28 s at 224², 0.023–0.03 s at 64²). Other models are assumed to run at VGG16's rate
#: per GFLOP; depthwise convolutions (EfficientNet, MobileNet) and attention run below it, which the
#: 5× margin of :func:`response_timeout` absorbs.
CPU_FIXED_S, CPU_S_PER_GFLOP = 0.005, 0.28 / VGG16_GFLOPS_224

#: GPU seconds per GFLOP of a masked forward, by precision, from the committed H100 measurement
#: (``benchmarks/results/gpu-notes.md``, "Latency, H100", files in ``benchmarks/results/gpu/2026-11-27-h100/``):
#: one UnionCAM explanation of VGG16 at 224² (512 + 4 masked forwards of 30.94 GFLOP, 64 per chunk) took
#: 82.6 ms in bf16, 81.8 ms in fp16, 108.5 ms in tf32 and 374.9 ms in strict fp32 (medians of 10 images).
#: Other GPUs and models are assumed to run at that rate per GFLOP; the 5× margin of :func:`response_timeout`
#: absorbs a slower GPU.
H100_UNIONCAM_VGG16_224_MS = {"bf16": 82.6, "fp16": 81.8, "tf32": 108.5, "fp32": 374.9}
GPU_S_PER_GFLOP = {p: ms / 1000 / ((512 + 4) * VGG16_GFLOPS_224) for p, ms in H100_UNIONCAM_VGG16_224_MS.items()}


def masked_forwards(method: str, channels: int = 512) -> int:
    """Masked forwards of one explanation at most: UnionCAM scores every channel plus its three β's and the
    black image, Score-CAM every channel plus the black image, Group-CAM 32 groups and the blur; a
    gradient method costs about three forwards' worth (its forward and backward)."""
    from ..methods.groupcam import GROUPCAM_GROUPS

    return {"unioncam": channels + 4, "scorecam": channels + 1, "groupcam": GROUPCAM_GROUPS + 2}.get(method, 3)


def explanation_seconds(method: str, image_size: int, device: str = "cpu", gflops: float | None = None,
                        channels: int = 512, targets: int = 1, precision: str = "bf16") -> float:
    """A rough upper estimate of one request's seconds: ``targets`` explanations of ``method``.

    ``gflops``: one forward of the served model at ``image_size`` (``None``: VGG16's, scaled by the pixels);
    ``channels``: its explained layer's. ``device`` ``cuda…``: the H100 rate of :data:`GPU_S_PER_GFLOP` for
    ``precision`` (the precision in force; ``auto`` is bf16 on a GPU); on a CPU the precision is not
    looked at (the CPU figure is fp32's, an upper estimate).
    """
    if gflops is None:
        gflops = VGG16_GFLOPS_224 * (image_size / 224) ** 2
    if device.startswith("cuda"):
        per_forward = GPU_S_PER_GFLOP.get(precision, GPU_S_PER_GFLOP["bf16"]) * gflops
    else:
        per_forward = CPU_FIXED_S + CPU_S_PER_GFLOP * gflops
    return targets * masked_forwards(method, channels) * per_forward


def response_timeout(image_size: int, batch_size: int = 1, device: str = "cpu", floor_s: int = 120,
                     gflops: float | None = None, channels: int = 512, precision: str = "bf16") -> int:
    """TorchServe's ``responseTimeout`` for a batch: 5× the slowest method's estimate per request (a worker
    has a share of the cores, and shares them with the others), at least ``floor_s``."""
    slowest = max(explanation_seconds(m, image_size, device, gflops, channels, precision=precision)
                  for m in ("unioncam", "scorecam", "groupcam"))
    return max(floor_s, math.ceil(5 * slowest * batch_size))


def _held_by_another(f) -> bool:
    """Whether another open file holds ``f``'s exclusive lock. Probes take a *shared* lock for an
    instant, so two probes never see each other as holders."""
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _lock(f, tries: int = 3) -> bool:
    """Take ``f``'s exclusive lock without blocking; a probe's instant shared lock is retried past."""
    for i in range(tries):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if i + 1 < tries:
                time.sleep(0.001)
    return False


def _pool_folder(key: str) -> Path:
    return Path(tempfile.gettempdir()) / f"unioncam-slots-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


_LEASES = itertools.count()


class WorkerLease:
    """This worker's mark in the model's pool folder, held for the process's life: a file ``worker-…``
    under an exclusive ``flock``. The kernel drops the lock when the process ends, however it ends
    (scaled down, killed, crashed), so :meth:`live` counts the workers actually running.

    ``group`` (a GPU's index, or ``""``) counts the workers of one GPU apart.
    """

    def __init__(self, key: str, group: str = "") -> None:
        self.folder = _pool_folder(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = f"worker-{group}-"
        # The pid and a count: KServe's server holds several replicas' leases in one process.
        self.path = self.folder / f"{self.prefix}{os.getpid()}-{next(_LEASES)}"
        # Locked under a name no one counts, then renamed: a count never sees it unlocked (and removes it).
        tmp = self.folder / f".new-{os.getpid()}-{time.monotonic_ns()}"
        self._file = open(tmp, "a+")  # noqa: SIM115 — held open (and locked) until the process ends
        fcntl.flock(self._file, fcntl.LOCK_EX)
        os.replace(tmp, self.path)

    def live(self) -> int:
        """Workers of this group whose lease is held now (this one included); stale files are removed."""
        n = 0
        for path in self.folder.glob(f"{self.prefix}*"):
            if path == self.path:
                n += 1
                continue
            try:
                f = open(path, "a+")
            except OSError:
                continue
            with f:
                if _held_by_another(f):
                    n += 1  # that worker is running
                    continue
                with contextlib.suppress(OSError):
                    path.unlink()  # its worker is gone
        return n

    def close(self) -> None:
        """Give the lease up (a worker's exit does the same)."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._file.close()


class Slots:
    """At most ``n`` holders at once across processes (the model's workers), by ``flock`` on files.

    ``key`` names the pool (the model's folder, shared by its workers; on a GPU, one pool per GPU).
    ``n``: a fixed limit (``0``: no limit), or ``None``: follow the live workers of ``lease`` —
    ``max(1, live − 1)``, so one running worker is kept for predictions and gradient methods while an
    idle worker is never refused. ``wait_s``: how long an explanation may wait for a slot (0: refused at
    once, the CPU's rule); one whose estimated wait exceeds it is refused at once.
    """

    #: Slot files looked at; a pool never allows more holders than this.
    MAX = 64

    def __init__(self, key: str, n: int | None, lease: WorkerLease | None = None, wait_s: float = 0.0) -> None:
        self.fixed = n
        self.lease = lease
        self.wait_s = float(wait_s)
        self.folder = _pool_folder(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        #: Seconds the last refused :meth:`acquire` estimated it would have waited (for ``Retry-After``).
        self.estimated_wait_s = 0.0

    @property
    def n(self) -> int:
        """Holders allowed now (0: no limit)."""
        if self.fixed is not None:
            return min(self.fixed, self.MAX)
        live = self.lease.live() if self.lease is not None else 1
        return min(max(1, live - 1), self.MAX)

    def _path(self, i: int) -> Path:
        return self.folder / f"slot-{i}"

    def _held(self) -> tuple[int, list[float]]:
        """Slots held now, and the end times their holders announced."""
        held, ends = 0, []
        for path in self.folder.glob("slot-*"):
            try:
                f = open(path, "a+")
            except OSError:
                continue
            with f:
                if _held_by_another(f):
                    held += 1
                    f.seek(0)
                    with contextlib.suppress(ValueError):
                        ends.append(float(f.read().strip() or "nan"))
        return held, [e for e in ends if e == e]

    def _try(self, seconds: float):
        n = self.n
        if n and self._held()[0] >= n:
            return None  # scaled down below the slots still held
        for i in range(n):
            f = open(self._path(i), "a+")  # noqa: SIM115 — closed on release
            if not _lock(f):
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{time.time() + seconds:.3f}\n")  # when this holder expects to be done
            f.flush()
            return f
        return None

    def estimated_wait(self) -> float:
        """Seconds until the first slot is expected to come free (0 if one is free)."""
        n = self.n
        held, ends = self._held()
        if not n or held < n:
            return 0.0
        return max(0.0, min(ends, default=time.time() + self.wait_s) - time.time())

    @contextlib.contextmanager
    def acquire(self, seconds: float = 0.0) -> Iterator[bool]:
        """Yields ``True`` holding a free slot (released on exit), ``False`` when none came free.

        ``seconds``: this holder's own estimate, announced to those who wait behind it. With ``wait_s``
        the call waits for a slot while the estimated wait stays within ``wait_s``.
        """
        if self.n == 0:
            yield True
            return
        f = self._try(seconds)
        if f is None and self.wait_s > 0:
            deadline = time.monotonic() + self.wait_s
            while f is None:
                wait = self.estimated_wait()
                if wait > deadline - time.monotonic() or time.monotonic() >= deadline:
                    self.estimated_wait_s = max(wait, 1.0)
                    break
                time.sleep(0.01)
                f = self._try(seconds)
        elif f is None:
            self.estimated_wait_s = self.estimated_wait()
        if f is None:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
