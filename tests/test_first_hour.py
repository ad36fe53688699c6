"""A user's first hour: too-small images refused clearly, one CLI (help, aliases, mistakes as sentences),
the shipped shapes samples, and what serves when nothing is named."""

from __future__ import annotations

import pytest
import torch

import unioncam
from unioncam import InvalidInputError
from unioncam.models import load_model, model_cost
from unioncam.models.cost import fits, smallest_side


# ------------------------------------------------------------------------------- too-small images


def test_too_small_image_names_the_smallest_size_the_model_takes():
    model = load_model("shapes", "random")  # three 2×2 poolings: 8×8 is the smallest
    assert smallest_side(model) == 8 and fits(model, (8, 8)) and not fits(model, (7, 7))
    with pytest.raises(InvalidInputError) as err:
        unioncam.explain(model, torch.rand(3, 6, 6), method="gradcam", precision="fp32")
    assert err.value.field == "image" and "6×6" in str(err.value) and "at least 8×8" in str(err.value)
    with pytest.raises(InvalidInputError) as err:  # one side is enough
        unioncam.explain_batch(model, [torch.rand(3, 16, 16), torch.rand(3, 5, 40)], method="gradcam",
                               precision="fp32")
    assert err.value.field == "images[1]" and "at least 8×8" in str(err.value)
    assert unioncam.explain(model, torch.rand(3, 8, 8), method="gradcam", precision="fp32").saliency.shape == (8, 8)


def test_archive_check_names_the_smallest_size_too():
    with pytest.raises(InvalidInputError) as err:
        model_cost("vgg16", 16)
    assert err.value.field == "image-size" and "at least 32" in str(err.value)
