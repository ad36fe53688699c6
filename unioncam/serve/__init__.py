"""Serving with TorchServe: the wire protocol, the thin handler, the archive and the server runner.

:mod:`.protocol` (plain Python) → :mod:`.handler` (TorchServe's entry point) → :mod:`.archive`
(``unioncam archive``) → :mod:`.server` (``unioncam serve``). The config template ``config.properties``
ships beside them.
"""
