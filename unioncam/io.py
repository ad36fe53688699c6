"""Reading images into pixel tensors, with clear errors for everything a user may upload."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from .errors import InvalidInputError

__all__ = ["decode_image", "load_image", "to_pixels", "MAX_PIXELS", "MIN_SIDE"]

#: Largest decoded image accepted (pixels); larger ones are refused before decoding (decompression bombs).
MAX_PIXELS = 50_000_000
#: Smallest side accepted: below this an image carries no spatial information for a CAM.
MIN_SIDE = 8


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (palette, RGBA, CMYK, 16-bit, 1-bit …) → 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bit by its own range rather than clipping at 255.
        t = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
        lo, hi = float(t.min()), float(t.max())
        t = (t - lo) / (hi - lo) * 255 if hi > lo else torch.zeros_like(t)
        img = Image.fromarray(t.round().to(torch.uint8).numpy(), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels must not become black (black is "masked out").
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def decode_image(data: bytes | bytearray | memoryview, field: str = "image") -> Image.Image:
    """Decode uploaded bytes into an RGB PIL image, or raise :class:`InvalidInputError` saying why."""
    if data is None or len(data) == 0:
        raise InvalidInputError(field, "is empty", "a JPEG, PNG, BMP, GIF, TIFF or WebP image")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise InvalidInputError(
                field, f"is {w}×{h} = {w * h} pixels, more than the {MAX_PIXELS} accepted", "smaller images"
            )
        img = ImageOps.exif_transpose(img)
        img.load()  # forces the full decode: truncated files fail here, not later
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInputError(field, f"is too large to decode ({exc})", "smaller images") from exc
    except UnidentifiedImageError as exc:
        raise InvalidInputError(
            field, "is not an image PIL can read", "a JPEG, PNG, BMP, GIF, TIFF or WebP image"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(field, f"could not be decoded ({exc})", "a complete, valid image file") from exc
    if min(img.size) < MIN_SIDE:
        raise InvalidInputError(
            field, f"is {img.size[0]}×{img.size[1]} pixels", f"images at least {MIN_SIDE}×{MIN_SIDE}"
        )
    return _to_rgb(img)


def to_pixels(img: Image.Image, size: int | tuple[int, int] | None = 224,
              interpolation: str = "bilinear") -> torch.Tensor:
    """RGB PIL image → float32 ``[3, H, W]`` in ``[0, 1]``, resized (no crop) to ``size`` if given, with
    ``interpolation`` (``bilinear``, ``bicubic``, ``nearest``, ``lanczos``, ``box``, ``hamming``: a timm
    model's ``interpolation``)."""
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        try:
            resample = Image.Resampling[str(interpolation).upper()]
        except KeyError:
            raise InvalidInputError("interpolation", f"{interpolation!r}",
                                    "bilinear, bicubic, nearest, lanczos, box or hamming") from None
        img = img.resize((hw[1], hw[0]), resample)
    return pil_to_tensor(img).float().div_(255.0)


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = 224,
               interpolation: str = "bilinear") -> torch.Tensor:
    """Read an image file into float32 ``[3, H, W]`` pixels in ``[0, 1]`` (see :func:`to_pixels`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"image {str(path)!r}", f"cannot be read ({exc.strerror or exc})") from exc
    return to_pixels(decode_image(data, field=f"image {str(path)!r}"), size, interpolation)
