"""Reference rows for the ground-truth table: the object mask itself used as the map (an oracle) and a
uniform-noise map (no information), scored with the same metrics and settings as ``run.sh``.

    PYTHONPATH=. python benchmarks/groundtruth/reference_rows.py [N]   # → benchmarks/results/groundtruth/reference/
"""

import sys
from pathlib import Path

import torch

from unioncam import metrics as M
from unioncam.eval.evaluate import summarize, write_tables
from unioncam.eval.groundtruth import make_dataset
from unioncam.models import load_shapes_cnn

if __name__ == "__main__":
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    model = load_shapes_cnn()
    x, y, masks = make_dataset(seed=1, n=n)  # the same pixels as make_data.py writes for run.sh
    maps = {
        "object mask (oracle)": masks.float(),
        "random map (uniform noise)": torch.rand(n, 64, 64, generator=torch.Generator().manual_seed(0)),
    }
    rows = []
    for name, sal in maps.items():
        t = y.tolist()
        vals = {
            "average_drop": M.average_drop(model, x, sal, t, per_image=True),
            "average_increase": M.average_increase(model, x, sal, t, per_image=True),
            "insertion": M.insertion_auc(model, x, sal, t, pixels_per_step=64, per_image=True),
            "deletion": M.deletion_auc(model, x, sal, t, pixels_per_step=64, per_image=True),
            "pointing_game": M.pointing_game(sal, list(masks), per_image=True),
            "energy_pointing_game": M.energy_pointing_game(sal, list(masks), per_image=True),
        }
        rows += [{"method": name, **{k: float(v[i]) for k, v in vals.items()}} for i in range(n)]
    summary = summarize(rows, list(maps))
    summary["settings"] = {
        "note": f"mean ± standard error over n images; ShapesCNN (committed weights), the first "
        f"{n} held-out images (seed 1) at 64×64, 64 pixels per insertion/deletion step, "
        f"targets: the true class; object area share {masks.float().mean():.4f}."
    }
    out = Path("benchmarks/results/groundtruth/reference")
    out.mkdir(parents=True, exist_ok=True)
    write_tables(summary, out)
    print((out / "results.md").read_text())
