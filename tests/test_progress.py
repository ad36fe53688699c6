"""Progress with a total, and result lines that say what they are.

The total of masked forwards is known before the forward/backward starts (the layer's channels from a
meta-device forward), shrinks to the exact count once constant channels are pruned, and the bar ends at
the number that ran. The command line draws one bar over its whole job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import unioncam
from unioncam.api import Explanation, Progress, job_rows
from unioncam.cli import _result_line, main
from unioncam.core.progress import layer_channels
from unioncam.methods import get as get_method
from unioncam.methods.unioncam import beta_tie, select
from unioncam.models import load_model


def _record(parts):
    seen: list[tuple[int, int | None]] = []
    return Progress(parts, bar=False, listener=lambda done, total: seen.append((done, total))), seen


@pytest.mark.parametrize("method", ["unioncam", "scorecam", "groupcam"])
def test_the_total_is_known_before_the_first_masked_forward_and_ends_at_the_count_that_ran(method):
    model = load_model("shapes", "random", seed=3)
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    impl = get_method(method)
    prog, seen = _record([(impl, 2)])
    res = unioncam.explain_batch(model, images, method=method, precision="fp32", progress=prog)
    prog.close()
    K = res[0].details["channels"]
    assert seen[0] == (0, 2 * impl.planned_forwards(K)), "the planned total comes before any forward"
    ran = sum(r.details["masked_forwards"] for r in res)
    assert prog.done == ran and prog.total == ran
    assert all(total is not None and done <= total for done, total in seen)
    first_forward = next(i for i, (done, _) in enumerate(seen) if done > 0)
    assert seen[first_forward][1] == ran, "pruned channels leave the total before the masked forwards run"


def test_a_model_the_meta_device_cannot_run_learns_its_total_from_the_pass():
    class Host(nn.Module):  # reads a value on the host: no meta forward
        def __init__(self):
            super().__init__()
            self.inner = load_model("shapes", "random", seed=1)
            self.default_layer = "inner." + self.inner.default_layer

        def forward(self, x):
            keep = 1.0 + 0.0 * float(x.flatten()[0])  # before the layer runs
            return self.inner(x) * keep

    model = Host().eval()
    layer = ("inner." + model.inner.default_layer, model.get_submodule(model.default_layer))
    assert layer_channels(model, layer, (32, 32)) is None
    assert layer_channels(model.inner, (model.inner.default_layer, layer[1]), (32, 32)) is not None
    prog, seen = _record([(get_method("scorecam"), 1)])
    res = unioncam.explain(model, torch.rand(3, 32, 32), method="scorecam", precision="fp32", progress=prog)
    assert seen[0][1] is not None and seen[-1] == (res.details["masked_forwards"],) * 2


def test_job_rows_counts_one_row_per_explanation():
    assert job_rows([None, 3]) == 2
    assert job_rows([None, None], top_k=3) == 6
    assert job_rows([[1, 2, 3], 4]) == 4


def _bars(stderr: str) -> list[tuple[str, int, int]]:
    return [(d.strip(), int(n), int(t)) for d, n, t in
            re.findall(r"([\w:/ -]+?):?\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", stderr.replace("\r", "\n"))]


def test_the_command_line_draws_one_bar_over_every_image_and_method(tmp_path, capsys):
    samples = sorted((Path(__file__).parents[1] / "samples" / "shapes").glob("*.png"))[:2]
    out = tmp_path / "out"
    rc = main(["explain", *map(str, samples), "--method", "unioncam,scorecam", "--model", "shapes",
               "--weights", "random", "--image-size", "32", "--precision", "fp32", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    bars = _bars(captured.err)
    assert bars, captured.err
    records = [json.loads(p.read_text()) for p in out.glob("*.json")]
    ran = sum(r["details"]["masked_forwards"] for r in records)
    K = records[0]["details"]["channels"]
    assert bars[0][1:] == (0, 2 * (K + 3) + 2 * K), "one total for both methods and both images, up front"
    assert bars[-1][1:] == (ran, ran), "the bar ends at the forwards that ran"
    assert {t for _, _, t in bars} <= set(range(ran, 4 * K + 7)), "one bar: its total only shrinks by pruning"
    lines = [x for x in captured.out.splitlines() if ".png" in x]
    assert len(lines) == 4 and all("RANDOM weights (random (seed 0))" in x for x in lines), captured.out


def test_the_result_line_says_when_the_map_is_flat_or_the_beta_s_tie():
    res = Explanation(torch.full((8, 8), 0.0), 3, 0.5, "unioncam",
                      {"selected": "region", "seconds": 1.0, "beta_tie": True})
    line = _result_line("x.png", "3", res, "unioncam", "shipped")
    assert "flat map" in line and "a tie" in line and "RANDOM" not in line
    res.saliency[2, 2] = 1.0
    res.details["beta_tie"] = False
    line = _result_line("x.png", "3", res, "unioncam", None)
    assert "flat" not in line and "tie" not in line


def test_a_beta_difference_within_float32_rounding_is_a_tie_and_the_strict_rule_still_decides():
    b = 0.0012
    bu, br = float(torch.tensor(0.9311167)), float(torch.tensor(0.9311166))  # one float32 step apart
    assert bu > br and beta_tie(bu, br, b) and beta_tie(br, bu, b) and beta_tie(bu, bu, b)
    assert not beta_tie(0.9311167, 0.9311, b) and not beta_tie(0.02, 0.01, b)
    maps = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    _, chosen = select(*maps, torch.tensor([bu]), torch.tensor([br]))
    assert bool(chosen[0]), "AMS stays strict: the tie is reported, not decided otherwise"
    res = unioncam.explain(load_model("shapes", "random", seed=2), torch.rand(3, 32, 32), precision="fp32")
    d = res.details
    assert d["beta_tie"] == beta_tie(d["beta_union"], d["beta_region"], d["baseline_score"])
