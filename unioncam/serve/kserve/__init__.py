"""The KServe backend: KServe's own model server (``kserve`` ≥ 0.21, the ``unioncam[kserve]`` extra).

:mod:`.model` (a ``kserve.Model`` over :mod:`unioncam.serve.service`), :mod:`.server` (``unioncam serve
--backend kserve``: loopback bind, key file, graceful stop), :mod:`.layout` (the model folder KServe mounts
at ``/mnt/models``, written by ``unioncam archive --kserve``). The image (``deploy/kserve/Dockerfile``)
installs and starts it with ``deploy/kserve/install-and-start.sh``. Nothing here imports the TorchServe backend.
"""
