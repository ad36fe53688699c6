"""Metrics on hand-made cases whose values are worked out by hand in each test.

Image: 4×4 white. Object: the top-left 2×2 block (row-major pixel indices 0, 1, 4, 5).
Maps: perfect (1 on the object), inverted (1 off the object), uniform (0.5 everywhere).
"""

import math

import pytest
import torch
from torch import nn

from unioncam import InvalidInputError
from unioncam.eval.metrics import (
    INSERTION_BLUR,
    average_drop,
    average_increase,
    deletion_auc,
    energy_pointing_game,
    insertion_auc,
    insertion_deletion_curves,
    pointing_game,
    region_mask,
)

OBJ = torch.zeros(4, 4, dtype=torch.bool)
OBJ[:2, :2] = True
PERFECT = OBJ.float()
INVERTED = 1 - PERFECT
UNIFORM = torch.full((4, 4), 0.5)
WHITE = torch.ones(1, 3, 4, 4)


class ObjectShare(nn.Module):
    """``f_0(z) = q``: the mean intensity of the object's pixels (log-probabilities as logits, so softmax = q)."""

    def forward(self, z):
        q = (z.mean(1) * OBJ).flatten(1).sum(1) / OBJ.sum()
        q = q.clamp(1e-7, 1 - 1e-7)
        return torch.stack([q.log(), (1 - q).log()], 1)


class ObjectMinusBackground(nn.Module):
    """``logit_0 = 4·(mean on object − mean off object)``, ``logit_1 = 0``: ``f_0 = sigmoid(logit_0)``."""

    def forward(self, z):
        g = z.mean(1)
        d = (g * OBJ).flatten(1).sum(1) / OBJ.sum() - (g * ~OBJ).flatten(1).sum(1) / (~OBJ).sum()
        return torch.stack([4 * d, torch.zeros_like(d)], 1)


class MeanBrightness(nn.Module):
    """``f_0(z)`` = the image's mean intensity, any size."""

    def forward(self, z):
        q = z.flatten(1).mean(1).clamp(1e-7, 1 - 1e-7)
        return torch.stack([q.log(), (1 - q).log()], 1)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


# --------------------------------------------------------------------------- Average Drop / Increase


def test_average_drop_by_hand():
    m = ObjectShare()
    # perfect keeps the object (q = 1, no drop); inverted deletes it (q = 0, drop 100 %); uniform halves it.
    assert average_drop(m, WHITE, PERFECT[None], [0]) == pytest.approx(0.0, abs=1e-4)
    assert average_drop(m, WHITE, INVERTED[None], [0]) == pytest.approx(100.0, abs=1e-4)
    assert average_drop(m, WHITE, UNIFORM[None], [0]) == pytest.approx(50.0, abs=1e-4)
    both = average_drop(
        m, WHITE.expand(3, -1, -1, -1), torch.stack([PERFECT, INVERTED, UNIFORM]), [0, 0, 0], per_image=True
    )
    assert torch.allclose(both, torch.tensor([0.0, 100.0, 50.0]), atol=1e-4)
    assert average_drop(
        m, WHITE.expand(3, -1, -1, -1), torch.stack([PERFECT, INVERTED, UNIFORM]), [0, 0, 0]
    ) == pytest.approx(50.0, abs=1e-4)


def test_average_drop_and_increase_with_a_contrast_model():
    m = ObjectMinusBackground()
    x = WHITE.expand(3, -1, -1, -1)
    maps = torch.stack([PERFECT, INVERTED, UNIFORM])
    # y = sigmoid(0) = 0.5 for the white image; perfect → sigmoid(4), inverted → sigmoid(−4), uniform → 0.5.
    y = 0.5
    drops = average_drop(m, x, maps, [0, 0, 0], per_image=True)
    expected = [0.0, 100 * (y - sigmoid(-4)) / y, 0.0]
    assert torch.allclose(drops, torch.tensor(expected), atol=1e-4)
    inc = average_increase(m, x, maps, [0, 0, 0], per_image=True)
    assert inc.tolist() == [100.0, 0.0, 0.0]  # o = y for the uniform map: not an increase (strict)
    assert average_increase(m, x, maps, [0, 0, 0]) == pytest.approx(100 / 3)


def test_average_drop_of_a_zero_score_is_zero_not_nan():
    m = ObjectShare()
    black = torch.zeros(1, 3, 4, 4)  # q clamps to 1e-7; class 0 of a black image: y ≈ 0, o ≈ 0
    assert average_drop(m, black, PERFECT[None], [0]) == pytest.approx(0.0, abs=1e-6)

    class Certain(nn.Module):
        def forward(self, z):
            return torch.tensor([[0.0, 1000.0]]).expand(z.shape[0], 2)  # f_0 underflows to exactly 0

    assert average_drop(Certain(), WHITE, PERFECT[None], [0]) == 0.0


def test_targets_default_to_the_predicted_class():
    m = ObjectMinusBackground()
    # Class 1 explained: the inverted map raises logit_1 − logit_0 → increase for class 1 only.
    assert average_increase(m, WHITE, INVERTED[None], [1]) == 100.0
    # argmax of the white image is a tie (0.5, 0.5) → class 0 (first), where the inverted map is a drop.
    assert average_increase(m, WHITE, INVERTED[None], None) == 0.0


# ---------------------------------------------------------------------------------- Insertion / Deletion


def test_deletion_curve_and_auc_by_hand():
    m = ObjectShare()
    curves = insertion_deletion_curves(
        m,
        WHITE.expand(3, -1, -1, -1),
        torch.stack([PERFECT, INVERTED, UNIFORM]),
        [0, 0, 0],
        "deletion",
        pixels_per_step=1,
    )
    assert curves.shape == (3, 17)
    # perfect: the 4 object pixels go first.
    assert torch.allclose(curves[0, :6], torch.tensor([1, 0.75, 0.5, 0.25, 0, 0]), atol=1e-5)
    # uniform: ties in row-major order → pixels 0, 1 (object), 2, 3 (not), 4, 5 (object).
    assert torch.allclose(curves[2, :7], torch.tensor([1, 0.75, 0.5, 0.5, 0.5, 0.25, 0]), atol=1e-5)
    aucs = deletion_auc(
        m,
        WHITE.expand(3, -1, -1, -1),
        torch.stack([PERFECT, INVERTED, UNIFORM]),
        [0, 0, 0],
        pixels_per_step=1,
        per_image=True,
    )
    # trapezoid over 16 steps: (Σ points − (first + last)/2) / 16
    perfect = (1 + 0.75 + 0.5 + 0.25 - 0.5) / 16  # 0.125
    inverted = (13 * 1 + 0.75 + 0.5 + 0.25 - 0.5) / 16  # 12 background pixels first: 0.875
    uniform = (1 + 0.75 + 0.5 + 0.5 + 0.5 + 0.25 - 0.5) / 16  # 0.1875
    assert torch.allclose(aucs, torch.tensor([perfect, inverted, uniform]), atol=1e-5)


def test_deletion_with_several_pixels_per_step():
    m = ObjectShare()
    # 4 pixels per step → 4 steps; perfect map: 1, 0, 0, 0, 0 → AUC = (1 − 0.5) / 4.
    assert deletion_auc(m, WHITE, PERFECT[None], [0], pixels_per_step=4) == pytest.approx(0.125, abs=1e-5)
    # 3 pixels per step → ⌈16/3⌉ = 6 steps; last step changes the remaining single pixel.
    curve = insertion_deletion_curves(m, WHITE, PERFECT[None], [0], "deletion", pixels_per_step=3)[0]
    assert torch.allclose(curve, torch.tensor([1, 0.25, 0, 0, 0, 0, 0]), atol=1e-5)


def test_insertion_by_hand_from_black():
    m = ObjectShare()
    black = lambda x: torch.zeros_like(x)
    aucs = insertion_auc(
        m,
        WHITE.expand(3, -1, -1, -1),
        torch.stack([PERFECT, INVERTED, UNIFORM]),
        [0, 0, 0],
        pixels_per_step=1,
        per_image=True,
        start=black,
    )
    perfect = (0 + 0.25 + 0.5 + 0.75 + 12 * 1 + 1 - 0.5) / 16  # 0.875
    inverted = (13 * 0 + 0.25 + 0.5 + 0.75 + 1 - 0.5) / 16  # 0.125
    uniform = (0 + 0.25 + 0.5 + 0.5 + 0.5 + 0.75 + 10 * 1 + 1 - 0.5) / 16  # 0.8125
    assert torch.allclose(aucs, torch.tensor([perfect, inverted, uniform]), atol=1e-5)


def test_insertion_starts_from_the_documented_blur():
    from torchvision.transforms.functional import gaussian_blur

    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    m = MeanBrightness()
    curve = insertion_deletion_curves(m, x, torch.rand(1, 16, 16), [0], "insertion", pixels_per_step=64)[0]
    k, s = INSERTION_BLUR
    blurred = gaussian_blur(x, [k, k], [s, s])
    assert curve[0] == pytest.approx(float(m(blurred).softmax(-1)[0, 0]), abs=1e-6)
    assert curve[-1] == pytest.approx(float(m(x).softmax(-1)[0, 0]), abs=1e-6)  # everything inserted
    assert curve.shape == (5,)


def test_insertion_deletion_batching_does_not_change_results(tiny_cnn):
    torch.manual_seed(1)
    x, s = torch.rand(3, 3, 12, 12), torch.rand(3, 12, 12)
    a = insertion_deletion_curves(tiny_cnn, x, s, None, "deletion", pixels_per_step=16, batch_size=1)
    b = insertion_deletion_curves(tiny_cnn, x, s, None, "deletion", pixels_per_step=16, batch_size=64)
    assert torch.allclose(a, b, atol=1e-6)  # float rounding only


def test_bad_arguments_name_the_input():
    m = ObjectShare()
    with pytest.raises(InvalidInputError, match="pixels_per_step"):
        deletion_auc(m, WHITE, PERFECT[None], [0], pixels_per_step=0)
    with pytest.raises(InvalidInputError, match="saliencies"):
        average_drop(m, WHITE, torch.ones(1, 3, 3), [0])
    with pytest.raises(InvalidInputError, match="targets"):
        average_drop(m, WHITE, PERFECT[None], [0, 1])
    with pytest.raises(InvalidInputError, match="box"):
        pointing_game(PERFECT, (3, 0, 1, 2))


# ------------------------------------------------------------------------------------ pointing games


def test_pointing_game_by_hand():
    assert pointing_game(PERFECT, OBJ) == 1.0  # every maximum inside
    assert pointing_game(INVERTED, OBJ) == 0.0
    assert pointing_game(UNIFORM, OBJ) == 0.0  # maxima everywhere, not all inside
    assert pointing_game(UNIFORM, (0, 0, 4, 4)) == 1.0  # … unless the box is the whole image
    peak = torch.zeros(4, 4)
    peak[3, 1] = 1.0  # row 3, column 1 → x = 1, y = 3
    assert pointing_game(peak, (1, 3, 2, 4)) == 1.0
    assert pointing_game(peak, (0, 0, 1, 4)) == 0.0  # x1 exclusive
    assert pointing_game(peak, [(0, 0, 1, 1), (1, 2, 4, 4)]) == 1.0  # union of boxes
    hits = pointing_game(torch.stack([PERFECT, INVERTED]), [OBJ, (0, 0, 2, 2)], per_image=True)
    assert hits.tolist() == [1.0, 0.0]


def test_energy_pointing_game_by_hand():
    assert energy_pointing_game(PERFECT, OBJ) == pytest.approx(1.0)
    assert energy_pointing_game(INVERTED, OBJ) == pytest.approx(0.0)
    assert energy_pointing_game(UNIFORM, OBJ) == pytest.approx(4 / 16)  # area share
    ramp = torch.arange(16.0).view(4, 4)
    # object holds 0 + 1 + 4 + 5 = 10 of Σ 0..15 = 120
    assert energy_pointing_game(ramp, (0, 0, 2, 2)) == pytest.approx(10 / 120)
    assert energy_pointing_game(torch.zeros(4, 4), OBJ) == 0.0
    both = energy_pointing_game(torch.stack([PERFECT, UNIFORM]), [OBJ, OBJ], per_image=True)
    assert torch.allclose(both, torch.tensor([1.0, 0.25]))


def test_region_mask_conventions():
    m = region_mask((1, 0, 3, 2), (4, 4))
    assert m.sum() == 4 and m[0, 1] and m[1, 2] and not m[0, 3] and not m[2, 1]
    assert region_mask((-5, -5, 100, 100), (4, 4)).all()  # clipped to the image
    with pytest.raises(InvalidInputError, match="mask"):
        region_mask(torch.ones(3, 3, dtype=torch.bool), (4, 4))
