"""The ground-truth benchmark: its committed model and the figure command."""

import json

import pytest
import torch
from .conftest import make_tiny_cnn
from PIL import Image

from pathlib import Path

from unioncam.cli import main
from unioncam.eval.figure import figure_grid
from unioncam.eval.groundtruth import make_dataset
from unioncam.models.shapes import SHAPE_CLASSES, ShapesCNN, default_weights, load_shapes_cnn

ROOT = Path(__file__).resolve().parent.parent


def test_shapes_cnn_contract():
    m = ShapesCNN().eval()
    x = torch.rand(2, 3, 64, 64)
    assert m(x).shape == (2, len(SHAPE_CLASSES))
    layer = dict(m.named_modules())[m.default_layer]
    assert isinstance(layer, torch.nn.ReLU)  # the last ReLU, as the docstring says
    assert 100_000 < sum(p.numel() for p in m.parameters()) < 1_000_000


def test_shipped_weights_reach_their_recorded_accuracy():
    info = json.loads((ROOT / "benchmarks" / "groundtruth" / "shapes_cnn.json").read_text())
    with default_weights() as path:
        assert path.is_file() and path.parent.name == "weights"  # package data, not a repo path
    model = load_shapes_cnn()
    x, y, _ = make_dataset(seed=info["heldout"]["seed"], n=info["heldout"]["n"])
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
    assert float((pred == y).float().mean()) == pytest.approx(info["heldout_accuracy"], abs=2e-3)
    assert info["heldout_accuracy"] > 0.8  # well above the 20 % of chance


def test_figure_grid(tmp_path):
    torch.manual_seed(0)
    images = [torch.rand(3, 24, 24) for _ in range(2)]
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[4:12, 4:12] = True
    path = figure_grid(
        make_tiny_cnn(), images, ["gradcam", "layercam"], tmp_path / "f.png", masks=[mask, None]
    )
    # 3 columns (input + 2 methods) × 2 rows of 1.6-inch cells at 80 dpi
    assert Image.open(path).size == (3 * 128, 2 * 128)


def test_figure_cli_with_shapes(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "figure",
                "--shapes",
                "2",
                "--size",
                "32",
                "--model",
                "unioncam.models.shapes:ShapesCNN",
                "--method",
                "gradcam,xgradcam",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).format == "PNG"
    assert main(["figure", "--model", "unioncam.models.shapes:ShapesCNN", "--out", str(out)]) == 2  # no images
