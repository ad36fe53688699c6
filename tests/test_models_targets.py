"""Several targets per image in one call: ``targets=[[a, b], None]`` and ``top_k``.

Each (image, target) explanation must equal the one-target call's (float rounding of other chunkings
aside), results come back as one list per image, and one int/``None`` per image keeps the flat list.
"""

import pytest
import torch

import unioncam
from unioncam import InvalidInputError

from .conftest import make_tiny_cnn

METHODS = unioncam.METHODS


def _images(n=2, size=(20, 20)):
    g = torch.Generator().manual_seed(4)
    return [torch.rand(3, *size, generator=g) for _ in range(n)]


def _same(a, b):
    assert a.target == b.target and a.method == b.method
    assert a.score == pytest.approx(b.score, abs=1e-6)
    torch.testing.assert_close(a.saliency, b.saliency, rtol=0, atol=1e-5)
    for k in ("selected", "active_channels", "active_groups"):
        assert a.details.get(k) == b.details.get(k)


@pytest.mark.parametrize("method", METHODS)
def test_lists_of_targets_equal_one_call_per_target(method):
    model = make_tiny_cnn()
    imgs = _images()
    out = unioncam.explain_batch(model, imgs, targets=[[3, 7, 3], None], method=method)
    assert [len(r) for r in out] == [3, 1]
    for i, (img, entry) in enumerate(zip(imgs, [[3, 7, 3], [None]])):
        for res, t in zip(out[i], entry):
            _same(res, unioncam.explain(model, img, target=t, method=method))


@pytest.mark.parametrize("method", ["unioncam", "gradcam", "scorecam"])
def test_top_k(method):
    model = make_tiny_cnn()
    imgs = _images()
    out = unioncam.explain_batch(model, imgs, top_k=3, targets=[None, 5], method=method)
    assert [len(r) for r in out] == [3, 1]
    with torch.no_grad():
        top = model(torch.stack(imgs)).softmax(-1).topk(3, dim=1).indices.tolist()
    assert [r.target for r in out[0]] == top[0] and out[1][0].target == 5
    assert out[0][0].score >= out[0][1].score >= out[0][2].score
    for res in out[0]:
        _same(res, unioncam.explain(model, imgs[0], target=res.target, method=method))
    single = unioncam.explain(model, imgs[0], top_k=2, method=method)
    assert isinstance(single, list) and [r.target for r in single] == top[0][:2]
    listed = unioncam.explain(model, imgs[0], target=[top[0][1]], method=method)
    assert isinstance(listed, list) and len(listed) == 1
    _same(listed[0], out[0][1])


def test_one_target_per_image_keeps_the_flat_list():
    model = make_tiny_cnn()
    imgs = _images()
    out = unioncam.explain_batch(model, imgs, targets=[2, None], method="gradcam")
    assert len(out) == 2 and all(isinstance(r, unioncam.Explanation) for r in out)
    assert isinstance(unioncam.explain(model, imgs[0], target=2), unioncam.Explanation)


def test_masked_forwards_are_shared_in_chunks():
    """All (image, target) rows go through one scorer: the chunk count is that of the total, not per row."""
    model = make_tiny_cnn()
    imgs = _images()
    calls = []
    orig = model.forward

    def counting(x):
        calls.append(x.shape[0])
        return orig(x)

    model.forward = counting
    out = unioncam.explain_batch(model, imgs, targets=[[1, 2], [3, 4]], method="scorecam", batch_size=64)
    rows = sum(r.details["masked_forwards"] for per in out for r in per)
    assert calls[0] == 2  # one gradient-free forward for both images, not one per target
    assert sum(calls[1:]) == rows and len(calls) - 1 == -(-rows // 64)


def test_bad_targets_and_top_k():
    model = make_tiny_cnn()
    img = _images(1)[0]
    with pytest.raises(InvalidInputError, match=r"targets\[0\]"):
        unioncam.explain_batch(model, [img], targets=[[]])
    with pytest.raises(InvalidInputError, match="target"):
        unioncam.explain_batch(model, [img], targets=[[1, "a"]])
    with pytest.raises(InvalidInputError, match="out of range"):
        unioncam.explain_batch(model, [img], targets=[[1, 10]], method="gradcam")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidInputError, match="top_k"):
            unioncam.explain(model, img, top_k=bad)
    with pytest.raises(InvalidInputError, match=r"top_k.*\[1, 10\]"):
        unioncam.explain(model, img, top_k=11, method="gradcam")


def test_cli_torchvision_model_and_top_k(tmp_path, capsys):
    from PIL import Image

    from unioncam.cli import main

    img = tmp_path / "cat.png"
    Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(img)
    out = tmp_path / "out"
    assert main(["explain", str(img), "--model", "resnet18", "--weights", "random", "--size", "64",
                 "--method", "gradcam", "--top-k", "2", "--out", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat.gradcam.top1.json", "cat.gradcam.top1.png",
                                                      "cat.gradcam.top2.json", "cat.gradcam.top2.png"]
    assert main(["explain", str(img), "--model", "resnet18", "--weights", "random", "--top-k", "2",
                 "--target", "3", "--out", str(out), "-q"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    fig = tmp_path / "fig.png"
    assert main(["figure", str(img), "--model", "swin_t", "--weights", "random", "--size", "64",
                 "--method", "gradcam,layercam", "--out", str(fig)]) == 0
    assert fig.stat().st_size > 0
