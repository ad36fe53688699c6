"""``unioncam evaluate`` end to end on a tiny folder: tiny images, tiny models, two methods."""

import dataclasses
import json

import pytest
import torch
from .conftest import make_tiny_cnn

from unioncam import InvalidInputError
from unioncam.eval import evaluate as ev
from unioncam.models import load_model
from unioncam.cli import main
from unioncam.eval.groundtruth import SHAPE_CLASSES, make_sample, write_folder


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_folder(root, seed=3, n=6, size=32)
    return root


def test_write_folder_layout(shapes_folder):
    items, classes = ev.find_images(shapes_folder / "images")
    assert len(items) == 6 and classes is not None
    for it in items:
        idx = int(it.path.stem.split("_")[1])
        s = make_sample(3, idx, 32)
        assert classes[it.target] == f"{s.label}_{SHAPE_CLASSES[s.label]}"  # sub-folder = the true class
    boxes = ev._voc_boxes(shapes_folder / "annotations" / f"{items[0].path.stem}.xml", 32, (32, 32))
    s = make_sample(3, int(items[0].path.stem.split("_")[1]), 32)
    assert boxes == [tuple(float(v) for v in s.box)]  # VOC 1-based inclusive → exclusive, round trip


def test_evaluate_end_to_end_and_resume(shapes_folder, tmp_path):
    model = make_tiny_cnn(classes=len(SHAPE_CLASSES))
    settings = ev.EvalSettings(method=("gradcam", "unioncam"), model="tiny", size=32, limit=4, seed=1,
                               pixels_per_step=64, masks=str(shapes_folder / "masks"))
    kw = {"model": model, "progress": False}
    summary = ev.evaluate(shapes_folder / "images", tmp_path, settings, **kw)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["method"] for r in rows} == {"gradcam", "unioncam"}
    assert len({r["image"] for r in rows}) == 4  # both methods on the same 4 sampled images
    for r in rows:
        assert 0 <= r["average_drop"] <= 100 and r["average_increase"] in (0.0, 100.0)
        assert 0 <= r["insertion"] <= 1 and 0 <= r["deletion"] <= 1
        assert r["pointing_game"] in (0.0, 1.0) and 0 <= r["energy_pointing_game"] <= 1
    table = {e["method"]: e for e in summary["table"]}
    gc = [r["deletion"] for r in rows if r["method"] == "gradcam"]
    assert table["gradcam"]["n"] == 4
    assert table["gradcam"]["deletion"] == pytest.approx(sum(gc) / 4)
    mean = sum(gc) / 4
    assert table["gradcam"]["deletion_se"] == pytest.approx((sum((v - mean) ** 2 for v in gc) / 3 / 4) ** 0.5)
    assert "union_selected" in table["unioncam"]
    md = (tmp_path / "results.md").read_text()
    assert "| gradcam | 4 |" in md and "Energy pointing game" in md
    assert (tmp_path / "results.csv").read_text().startswith("method,n,average_drop,average_drop_se")

    # Resume: drop the last two rows and cut one short, as an interruption would; a rerun redoes only those.
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:10] + "\n")
    summary2 = ev.evaluate(shapes_folder / "images", tmp_path, settings, **kw)
    rows2 = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()[:5]]
    assert rows2 == rows[:5]  # kept, not recomputed
    assert [e["n"] for e in summary2["table"]] == [4, 4]
    for a, b in zip(summary["table"], summary2["table"]):
        assert a["insertion"] == pytest.approx(b["insertion"], abs=1e-6)  # same numbers after the resume

    # Other settings in the same folder are refused rather than mixed in.
    with pytest.raises(InvalidInputError, match="out"):
        ev.evaluate(shapes_folder / "images", tmp_path, dataclasses.replace(settings, pixels_per_step=32), **kw)


def test_cli_with_a_model_factory(shapes_folder, tmp_path, capsys):
    # Any pixel-space classifier through module:factory; boxes from VOC annotations; predicted targets.
    rc = main(
        [
            "evaluate",
            str(shapes_folder / "images"),
            "--model",
            "unioncam.models.shapes:ShapesCNN",
            "--method",
            "gradcam,layercam",
            "--size",
            "32",
            "--limit",
            "2",
            "--pixels-per-step",
            "128",
            "--targets",
            "predicted",
            "--annotations",
            str(shapes_folder / "annotations"),
            "--out",
            str(tmp_path),
            "-q",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| layercam | 2 |" in out and "Pointing game" in out
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert settings["targets"] == "predicted" and settings["images"] == 2 and settings["images_found"] == 6


def test_bad_folder_and_model_are_named(tmp_path):
    with pytest.raises(InvalidInputError, match="folder"):
        ev.find_images(tmp_path / "missing")
    with pytest.raises(InvalidInputError, match="folder"):
        ev.find_images(tmp_path)  # empty
    with pytest.raises(InvalidInputError, match="model"):
        load_model("resnet")
    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "o"), "-q"]) == 2


def test_shapes_generator_is_deterministic_and_masks_match():
    a, b = make_sample(0, 7, 32), make_sample(0, 7, 32)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.label == b.label
    assert not torch.equal(make_sample(0, 8, 32).image, a.image)
    assert 0 < a.mask.float().mean() < 0.5  # an object, not the whole image


def test_cli_with_vgg16_and_drop_increase_only(shapes_folder, tmp_path, capsys):
    # The paper's Table 1 path (VGG16, Average Drop / Increase only), on random weights and 32×32 pixels.
    rc = main(["evaluate", str(shapes_folder / "images"), "--model", "vgg16", "--weights", "random",
               "--method", "gradcam", "--size", "32", "--limit", "1", "--no-insertion-deletion",
               "--targets", "predicted", "--out", str(tmp_path), "-q"])  # fmt: skip
    assert rc == 0
    row = json.loads((tmp_path / "results.jsonl").read_text())
    assert "average_drop" in row and "insertion" not in row and "deletion" not in row
    assert "Insertion" not in capsys.readouterr().out
