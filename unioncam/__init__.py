"""UnionCAM (Hu et al. 2024) and the classic CAM baselines, batched and exact.

Quick start, offline, on the trained shapes CNN that ships in the package (docs/getting-started.md)::

    import unioncam
    model = unioncam.load_model("shapes")            # or "vgg16" (ImageNet weights), "resnet50", …
    img = unioncam.load_image("samples/shapes/cross.png", size=64)  # float [3, 64, 64] in [0, 1]
    res = unioncam.explain(model, img, progress=True)  # method="unioncam", the predicted class
    res.saliency, res.target, res.score, res.details

Layers, imports one way: ``kernels`` → ``core`` (capture, scorer) → ``methods`` → ``api`` → ``eval``,
``serve``, ``cli``.
"""

from .api import METHODS, Explanation, explain, explain_batch, prepare
from .errors import InvalidInputError
from .io import decode_image, load_image, to_pixels
from .methods import register as register_method
from .models import PixelVGG16, imagenet_categories, load_model, load_vgg16
from .viz import overlay, overlay_png

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Explanation",
    "InvalidInputError",
    "PixelVGG16",
    "decode_image",
    "explain",
    "explain_batch",
    "imagenet_categories",
    "load_image",
    "load_model",
    "load_vgg16",
    "overlay",
    "overlay_png",
    "prepare",
    "register_method",
    "to_pixels",
]
