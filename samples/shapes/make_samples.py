"""Writes samples/shapes/<class>.png: for each class of the shapes CNN, the first image of that class in the
held-out split (seed 1) of the ground-truth benchmark's generator, at 64×64, the size the CNN was trained on.

    python samples/shapes/make_samples.py      # the same bytes on every machine
"""

from pathlib import Path

from PIL import Image

from unioncam.eval.groundtruth import SHAPE_CLASSES, make_sample

SEED, SIZE = 1, 64  # the held-out split: the CNN never saw these images


def first_of_each_class(seed: int = SEED, size: int = SIZE) -> dict[str, int]:
    """Class name → the index of its first image in the split."""
    found: dict[str, int] = {}
    i = 0
    while len(found) < len(SHAPE_CLASSES):
        label = make_sample(seed, i, size).label
        found.setdefault(SHAPE_CLASSES[label], i)
        i += 1
    return found


def main(out: Path = Path(__file__).resolve().parent) -> None:
    for name, index in first_of_each_class().items():
        s = make_sample(SEED, index, SIZE)
        Image.fromarray(s.image.mul(255).round().byte().permute(1, 2, 0).numpy(), mode="RGB").save(out / f"{name}.png")
        print(f"{out / name}.png  (seed {SEED}, index {index})")


if __name__ == "__main__":
    main()
