"""Serving: one protocol and service, two backends (TorchServe, KServe's own model server).

:mod:`.protocol` (the wire format, plain Python) → :mod:`.service` (a batch of requests in, answers out:
isolation, slots, limits of :mod:`.limits`) → one folder per backend, each a thin translation of its
framework's requests to the service: :mod:`.torchserve` (the handler, the server runner) and
:mod:`.kserve` (a ``kserve.Model``, the server runner, the model folder). :mod:`.archive` holds the
settings both load (``model-config.yaml``) and builds the ``.mar``; :mod:`.runner` is the command line
that picks a backend; :mod:`.viewer` is the browser page, in front of either.
"""
