"""``unioncam archive``, ``serve``, ``config`` and ``token``: the commands, and which backend runs them.

``unioncam serve`` runs TorchServe (:mod:`unioncam.serve.torchserve.server`, the default) or, with
``--backend kserve``, KServe's own model server (:mod:`unioncam.serve.kserve.server`). Both serve the
same :class:`~unioncam.serve.service.UnionCAMService`. This module is the only one that knows both
backends, and it imports each only when its command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .runs import add_archive_options, resolve, settings_of

__all__ = ["BACKENDS", "add_parser"]

#: ``unioncam serve --backend``: TorchServe (archived 2025-08, model archives) or KServe's model server.
BACKENDS = ("torchserve", "kserve")


def _cmd_archive(args: argparse.Namespace) -> int:
    resolve(args, "archive")
    if args.kserve:
        from .kserve.layout import write_layout

        settings = settings_of(args)
        layout = write_layout(settings, args.kserve)
        print("\n".join(str(p) for p in layout.files) + f"\n({args.model}, weights {settings.weights_label}); upload "
              f"{layout.root}/ as the InferenceService's storageUri: KServe puts it at /mnt/models (deploy/kserve/)")
        return 0
    from .archive import build_archive

    settings = settings_of(args)
    mar = build_archive(settings, args.model_store, args.name, force=True)
    print(f"{mar}  ({mar.stat().st_size / 1e6:.1f} MB, {args.model}, weights {settings.weights_label})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.backend == "kserve":
        from .kserve.server import serve
    else:
        refused = [flag for flag, on in (("--host", args.host is not None), ("--no-auth", args.no_auth),
                                         ("--model-dir", args.model_dir is not None)) if on]
        if refused:
            raise ValueError(f"{', '.join(refused)}: the TorchServe backend takes its addresses and token settings "
                             "from --config (config.properties) and its model from the archive; accepted: "
                             "these with --backend kserve")
        from .torchserve.server import serve
    return serve(args)


def _cmd_config(args: argparse.Namespace) -> int:
    from .torchserve.server import print_config

    return print_config(args)


def _cmd_token(args: argparse.Namespace) -> int:
    run_dir = Path(args.runs) / args.run_name
    marker = run_dir / "backend"
    if marker.is_file() and marker.read_text().strip() == "kserve":
        from .kserve.server import renew_token
    else:
        from .torchserve.server import renew_token
    return renew_token(args)


def add_parser(subparsers: Any) -> None:
    """Register ``archive``, ``serve``, ``config`` and ``token``."""
    from ..validation import port_arg

    ar = subparsers.add_parser("archive", help="build the TorchServe archive model_store/NAME.mar (or --kserve DIR)",
                               description="Build NAME.mar with the handler, the unioncam package, "
                               "index_to_name.json, model-config.yaml and the weights.")
    add_archive_options(ar)
    ar.add_argument("--kserve", metavar="DIR", default=None,
                    help="write the model folder KServe's native runtime loads from /mnt/models instead: "
                    "DIR/model-config.yaml, DIR/index_to_name.json and the weights (deploy/kserve/)")
    ar.set_defaults(func=_cmd_archive)
    sv = subparsers.add_parser("serve", help="run the server in the foreground (TorchServe, or KServe's model server)",
                               description="TorchServe (the default): build model_store/NAME.mar if missing or "
                               "built with other settings, and run TorchServe with its temp, log, metric and pid "
                               "files under runs/RUN_NAME/. --backend kserve: write the model folder to "
                               "runs/RUN_NAME/model (or serve --model-dir) and run KServe's model server on one "
                               "port. Ctrl-C stops either.")
    sv.add_argument("--backend", choices=BACKENDS, default="torchserve",
                    help="torchserve (archived 2025-08; .mar archives; the default) or kserve (KServe's own model "
                    "server: v1/v2 routes, the image of deploy/kserve/)")
    add_archive_options(sv)
    sv.add_argument("--config", default=None,
                    help="config.properties to use; default the shipped template (unioncam/serve/torchserve/config.properties)")
    sv.add_argument("--port", type=port_arg, default=None,
                    help="base port: inference BASE, management BASE+1, metrics BASE+2, gRPC BASE+3/BASE+4; "
                    "default the template's 8080/8081/8082/7070/7071 (kserve: the one HTTP port, default 8080)")
    sv.add_argument("--host", default=None,
                    help="kserve: the address to listen on; default 127.0.0.1 (the container passes 0.0.0.0)")
    sv.add_argument("--no-auth", action="store_true",
                    help="kserve: no key (only behind a mesh or ingress that authenticates, as in a cluster)")
    sv.add_argument("--model-dir", default=None,
                    help="kserve: serve this model folder (`unioncam archive --kserve DIR`; /mnt/models in a pod) "
                    "instead of one written from the options above")
    sv.add_argument("--runs", default="runs", help="parent of run folders; default ./runs")
    sv.add_argument("--run-name", default=None, help="run folder name; default the start time")
    sv.add_argument("--rebuild", action="store_true",
                    help="rebuild the archive even if present with the same settings (e.g. a changed engine)")
    sv.add_argument("--startup-timeout", type=float, default=300.0,
                    help="seconds to wait for the model's workers; default 300")
    sv.add_argument("--viewer", action="store_true",
                    help="also serve the browser page (upload an image, compare methods) on 127.0.0.1; it holds "
                    "the token and forwards to the server")
    sv.add_argument("--viewer-port", type=port_arg, default=None,
                    help="the page's port (implies --viewer); default the inference port + 10 (8090)")
    sv.set_defaults(func=_cmd_serve)
    cf = subparsers.add_parser("config", help="print a config.properties for plain `torchserve --start`",
                               description="Print the shipped config.properties (loopback only, token "
                               "authorization on) for a TorchServe you start yourself: "
                               "torchserve --start --ts-config config.properties (docs/torchserve.md).")
    cf.add_argument("--port", type=int, default=None,
                    help="base port: inference BASE, management BASE+1, metrics BASE+2, gRPC BASE+3/BASE+4; "
                    "default 8080/8081/8082/7070/7071")
    cf.add_argument("--enable-model-api", action="store_true",
                    help="let POST /models register archives through the management API (whoever holds the "
                    "management key can then load code into the server); default off")
    cf.add_argument("--model-store", default=None, help="write model_store=PATH (absolute) into the file")
    cf.set_defaults(func=_cmd_config)
    tk = subparsers.add_parser("token", help="renew the key of a running server (keys expire after 60 minutes)",
                               description="Ask the running server for a new key (TorchServe: its token API, "
                               "authorised by the run's API key; kserve: written into the run folder, read by the server at once) and print it; key_file.json is updated.")
    tk.add_argument("--runs", default="runs", help="parent of run folders; default ./runs")
    tk.add_argument("--run-name", default="current", help="run folder; default current (the latest)")
    tk.add_argument("--type", choices=("inference", "management"), default="inference",
                    help="which key: inference (predictions, explanations) or management; default inference")
    tk.set_defaults(func=_cmd_token)
