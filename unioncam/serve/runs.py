"""What both serving backends' commands share: the archive options, settings from them, ports, run folders.

:mod:`unioncam.serve.runner` builds the ``archive`` / ``serve`` / ``config`` / ``token`` commands from these;
:mod:`unioncam.serve.torchserve.server` and :mod:`unioncam.serve.kserve.server` run them.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path
from typing import Any

from .archive import ArchiveSettings

__all__ = ["add_archive_options", "busy_ports", "free_port", "new_run_dir", "resolve", "settings_of"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_of(args: argparse.Namespace) -> ArchiveSettings:
    return ArchiveSettings(model=args.model, weights=args.weights, seed=args.weights_seed, image_size=args.image_size, method=args.method,
                           theta=args.theta, layer=args.layer, batch_size=args.batch_size, precision=args.precision,
                           max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay,
                           response_timeout_s=args.response_timeout, workers=args.workers,
                           explain_slots=args.explain_slots, device=args.device,
                           workers_per_gpu=args.workers_per_gpu, explain_wait_s=args.explain_wait)


def resolve(args: argparse.Namespace, command: str) -> None:
    """``--model`` / ``--weights`` / ``--image-size`` left out: the rule of every command
    (:mod:`unioncam.models.defaults`: VGG16 if its ImageNet weights are cached, else the shapes CNN)."""
    from ..models.defaults import resolve_args

    resolve_args(args, command, size="image_size")


def busy_ports(ports: dict[str, int]) -> list[str]:
    """The ports of ``ports`` that something on 127.0.0.1 already holds, as 'NAME PORT'."""
    busy = []
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"{name.replace('_', ' ')} {port}")
    return busy


def new_run_dir(runs: str | Path, run_name: str | None) -> Path:
    """``runs/RUN_NAME`` (default: the start time), created, with ``runs/current`` pointing to it."""
    run_dir = Path(runs) / (run_name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    current = Path(runs) / "current"  # a stable pointer to the latest run folder
    tmp_link = Path(runs) / ".current.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(run_dir.name)
    tmp_link.replace(current)
    return run_dir


def add_archive_options(p: argparse.ArgumentParser) -> None:
    from ..methods import METHODS
    from ..models.defaults import MODEL_HELP, WEIGHTS_HELP, model_arg
    from ..validation import PRECISION_CHOICES, positive_int_arg, theta_arg

    p.add_argument("--model", default=None, type=model_arg, metavar="NAME",
                   help=MODEL_HELP.format(factory=""))
    p.add_argument("--weights", default=None,
                   help=WEIGHTS_HELP + " (for random only the seed is archived)")
    p.add_argument("--weights-seed", "--seed", dest="weights_seed", type=int, default=0,
                   help="seed of --weights random; default 0 (--seed is its old spelling)")
    p.add_argument("--name", default="unioncam", help="model name (the .mar is NAME.mar); default unioncam")
    p.add_argument("--model-store", default="model_store", help="where the .mar goes; default ./model_store")
    p.add_argument("--image-size", "--size", dest="image_size", type=positive_int_arg, default=None,
                   help="images are resized to SIZE×SIZE; default the model's own: 64 for shapes, else 224")
    p.add_argument("--method", default="unioncam", choices=METHODS,
                   help="the method of a request that names none; default unioncam")
    p.add_argument("--theta", type=theta_arg, default=10.0,
                   help="UnionCAM θ of a request that names none, in [0, 100]; default 10")
    p.add_argument("--layer", default=None,
                   help="explained layer; default the model's (vgg16: features.29, resnet: layer4, README table)")
    p.add_argument("--batch-size", type=positive_int_arg, default=None,
                   help="masked inputs per forward; default the engine's: 64 on CUDA, on a CPU 8 at 224² up to 64 at 32²")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32; decided by each worker "
                   "on its device), fp32 (strict float32), tf32 (CUDA), or bf16/fp16 for the masked forwards "
                   "(autocast; scores stay float32); default auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="the machine the defaults are made for (batching, workers, timeouts, slots); "
                   "default cuda when this machine has a GPU, else cpu")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="requests per handler call; default 1 on cpu (a batch is answered all at once: a slow "
                   "explanation would hold up its batch-mates), 8 on cuda (explanations of one batch share chunks)")
    p.add_argument("--max-batch-delay", type=int, default=None,
                   help="milliseconds TorchServe waits to fill a batch; default 50 on cpu, 10 on cuda")
    p.add_argument("--response-timeout", type=int, default=None,
                   help="seconds per batch; default 5× the slowest method's estimate on --device at --image-size, "
                   "≥ 120 (cpu 224²: 736 s, 64²: 120 s)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes; default 2 on cpu (they share the cores), GPUs × --workers-per-gpu on cuda")
    p.add_argument("--workers-per-gpu", type=int, default=2,
                   help="cuda: workers per GPU (one is kept for predictions while another explains); default 2")
    p.add_argument("--explain-slots", type=int, default=None,
                   help="UnionCAM/Score-CAM/Group-CAM explanations at once; default the live workers − 1 "
                   "(per GPU on cuda), so predictions always find a worker, following scaling")
    p.add_argument("--explain-wait", type=float, default=None,
                   help="seconds an explanation may wait for a slot before 503 + Retry-After; default 0 on cpu "
                   "(refused at once), on cuda four batches' estimate (at least 2 s)")
