"""The TorchServe backend: the handler TorchServe imports from the archive, and the server runner.

:mod:`.handler` (TorchServe's entry point, a thin adapter of :mod:`unioncam.serve.service`) and
:mod:`.server` (``unioncam serve --backend torchserve``, ``unioncam config``); the archive itself is
:mod:`unioncam.serve.archive`. The config template ``config.properties`` ships beside them.
"""
