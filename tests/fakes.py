"""Serving-test helpers: a stand-in for TorchServe's context (the handler in-process), a seeded noise PNG,
and running ``unioncam serve`` until Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SIZE = 32


def random_png(seed: int = 3, side: int = 40) -> bytes:
    """A ``side``×``side`` PNG of seeded uniform noise: a valid upload whose bytes never change."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(side, side, 3, generator=g) * 255).byte().numpy()).save(buf, format="PNG")
    return buf.getvalue()


class FakeContext:
    """What the handler uses of ``ts.context.Context``, recording what it sets per request."""

    def __init__(self, model_dir: Path, headers: list[dict[str, str]]) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = {"handler": {"image_size": SIZE, "method": "unioncam", "theta": 10.0,
                                              "weights": "random", "seed": 0, "batch_size": 64,
                                              "explain_slots": 1}}
        self.model_name = "unioncam"
        self.metrics = None
        self.headers = headers
        self.status: dict[int, int] = {}
        self.content_type: dict[int, str] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def get_request_header(self, idx, key):
        return self.headers[idx].get(key)

    def set_response_status(self, code=200, phrase="", idx=0):
        assert phrase.isascii()
        self.status[idx] = code

    def set_response_content_type(self, idx, value):
        self.content_type[idx] = value

    def set_response_header(self, idx, key, value):
        self.response_headers.setdefault(idx, {})[key] = value


def ready_lines(proc: subprocess.Popen, seconds: float = 240) -> list[str]:
    """``unioncam serve``'s output up to its last start-up line; fails with the output if it never gets ready."""
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C stops"):
            break
    assert any(x.startswith("ready:") for x in lines), "".join(lines)
    return lines


@dataclass
class Served:
    """A running ``unioncam serve``: its start-up ``lines``, and after :meth:`stop` the rest of its output."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    rest: str = ""

    def stop(self) -> str:
        """Ctrl-C (SIGINT, what the terminal sends); the server must end cleanly with 0. Returns its last output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.rest, _ = self.proc.communicate(timeout=60)
            assert self.proc.returncode == 0, "".join(self.lines) + self.rest
        return self.rest


@contextlib.contextmanager
def serving(proc: subprocess.Popen, seconds: float = 240) -> Iterator[Served]:
    """Wait for ``unioncam serve`` (started by ``proc``) to be ready; stop it with Ctrl-C at the end of the
    block (asserting a clean exit), or kill it if the block failed."""
    served = Served(proc)
    try:
        served.lines = ready_lines(proc, seconds)
        yield served
        served.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
