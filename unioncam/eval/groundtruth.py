"""A ground-truth benchmark that needs no download: synthetic shapes on clutter (the CNN: ``models.shapes``).

Each image holds one *object* — a filled shape whose kind is the class — on a cluttered background of
*distractors* (line segments, small dots, thin arcs and a smooth colour gradient). Object and distractor
colours are drawn from the same distribution, so colour says nothing about the class: only the
object's shape does, and the object's pixel mask is the ground truth of where the evidence is.

Everything is a pure function of ``(seed, index)``: the same call gives the same pixels on every machine.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import pil_to_tensor

from ..models.shapes import SHAPE_CLASSES

__all__ = ["SHAPE_CLASSES", "Sample", "make_dataset", "make_sample", "write_folder"]


@dataclass
class Sample:
    """One generated image: pixels ``[3, H, W]`` in ``[0, 1]``, its class and the object's mask ``[H, W]``."""

    image: torch.Tensor
    label: int
    mask: torch.Tensor

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the mask, ``x1``/``y1`` exclusive."""
        ys, xs = self.mask.nonzero(as_tuple=True)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))  # type: ignore[return-value]


def _contrasting(rng: random.Random, against: tuple[int, int, int]) -> tuple[int, int, int]:
    # The object must be visible: redraw until it differs clearly from the local background.
    for _ in range(50):
        c = _colour(rng)
        if sum(abs(a - b) for a, b in zip(c, against)) > 180:
            return c
    return tuple(255 - a for a in against)  # type: ignore[return-value]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    r: float,
    angle: float,
    fill: int | tuple[int, int, int],
) -> None:
    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if kind == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "ring":
        w = max(2.0, r * 0.35)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=round(w))
    elif kind == "square":
        s = r * 0.85
        draw.polygon(rot([(-s, -s), (s, -s), (s, s), (-s, s)]), fill=fill)
    elif kind == "triangle":
        draw.polygon(
            rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]),
            fill=fill,
        )
    elif kind == "cross":
        t = r * 0.33
        draw.polygon(
            rot(
                [
                    (-t, -r),
                    (t, -r),
                    (t, -t),
                    (r, -t),
                    (r, t),
                    (t, t),
                    (t, r),
                    (-t, r),
                    (-t, t),
                    (-r, t),
                    (-r, -t),
                    (-t, -t),
                ]
            ),
            fill=fill,
        )
    else:  # pragma: no cover - the class list is fixed
        raise ValueError(kind)


def make_sample(seed: int, index: int, size: int = 64) -> Sample:
    """The ``index``-th image of the data set with ``seed``: deterministic, independent of other indices."""
    rng = random.Random(f"{seed}:{index}")
    label = rng.randrange(len(SHAPE_CLASSES))
    # Background: a smooth two-colour gradient in a random direction.
    c0, c1 = _colour(rng), _colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    t = ((xx * math.cos(theta) + yy * math.sin(theta)) * 0.5 + 0.5).clamp(0, 1)[None]
    bg = torch.tensor(c0).view(3, 1, 1) * (1 - t) + torch.tensor(c1).view(3, 1, 1) * t
    img = Image.fromarray(bg.round().byte().permute(1, 2, 0).numpy(), mode="RGB")
    draw = ImageDraw.Draw(img)
    # Clutter: segments, dots and open arcs — none of them a filled shape of the classes.
    for _ in range(rng.randint(6, 12)):
        kind = rng.random()
        x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
        if kind < 0.45:
            ln = rng.uniform(size * 0.15, size * 0.5)
            a = rng.uniform(0, 2 * math.pi)
            draw.line(
                [x0, y0, x0 + ln * math.cos(a), y0 + ln * math.sin(a)],
                fill=_colour(rng),
                width=rng.randint(1, 2),
            )
        elif kind < 0.8:
            r = rng.uniform(1.0, 2.5)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=_colour(rng))
        else:
            r = rng.uniform(size * 0.08, size * 0.2)
            start = rng.uniform(0, 360)
            draw.arc(
                [x0 - r, y0 - r, x0 + r, y0 + r],
                start,
                start + rng.uniform(60, 160),
                fill=_colour(rng),
                width=1,
            )
    # The object, anywhere it fits.
    r = rng.uniform(size * 0.13, size * 0.22)
    cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
    angle = rng.uniform(0, 2 * math.pi)
    local = img.getpixel((int(cx), int(cy)))
    mask_img = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask_img), SHAPE_CLASSES[label], cx, cy, r, angle, 255)
    _draw_shape(draw, SHAPE_CLASSES[label], cx, cy, r, angle, _contrasting(rng, local))
    image = pil_to_tensor(img).float().div_(255.0)
    mask = pil_to_tensor(mask_img)[0] > 127
    return Sample(image, label, mask)


def make_dataset(
    seed: int, n: int, size: int = 64, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``[n, 3, H, W]``, labels ``[n]`` and masks ``[n, H, W]`` of indices ``start … start + n − 1``."""
    samples = [make_sample(seed, start + i, size) for i in range(n)]
    return (
        torch.stack([s.image for s in samples]),
        torch.tensor([s.label for s in samples]),
        torch.stack([s.mask for s in samples]),
    )


def _voc_xml(name: str, size: int, label: str, box: tuple[int, int, int, int]) -> str:
    x0, y0, x1, y1 = box
    # VOC boxes are 1-based and inclusive.
    return (
        f"<annotation><filename>{name}.png</filename><size><width>{size}</width><height>{size}</height>"
        f"<depth>3</depth></size><object><name>{label}</name><bndbox><xmin>{x0 + 1}</xmin>"
        f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>\n"
    )


def write_folder(out: str | os.PathLike, seed: int, n: int, size: int = 64, start: int = 0) -> Path:
    """Write samples as ``out/images/<class>/<name>.png`` (targets from sub-folders), ``out/masks/<name>.png``
    (object masks) and ``out/annotations/<name>.xml`` (Pascal VOC boxes), the layout ``unioncam evaluate`` reads.
    """
    out = Path(out)
    for i in range(start, start + n):
        s = make_sample(seed, i, size)
        name = f"{seed}_{i:06d}"
        cls = f"{s.label}_{SHAPE_CLASSES[s.label]}"
        for sub in (out / "images" / cls, out / "masks", out / "annotations"):
            sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image.mul(255).round().byte().permute(1, 2, 0).numpy(), mode="RGB").save(
            out / "images" / cls / f"{name}.png"
        )
        Image.fromarray(s.mask.byte().mul(255).numpy(), mode="L").save(out / "masks" / f"{name}.png")
        (out / "annotations" / f"{name}.xml").write_text(_voc_xml(name, size, SHAPE_CLASSES[s.label], s.box))
    return out
