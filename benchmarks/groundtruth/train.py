"""Train the ground-truth benchmark's ShapesCNN on CPU (one thread) and save its weights and accuracy.

    PYTHONPATH=. python benchmarks/groundtruth/train.py            # ≈ 10 minutes on one CPU core

Training images: seed 0, indices 0 … TRAIN−1. Held-out images: seed 1 (never seen in training), the
split the benchmark table is computed on. Writes ``shapes_cnn.pt`` (state dict; shipped as ``unioncam/models/weights/shapes_cnn.pt``) and ``shapes_cnn.json``
(accuracy and the settings) beside this file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unioncam.eval.groundtruth import make_dataset
from unioncam.models.shapes import SHAPE_CLASSES, ShapesCNN

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=12000, help="training images (seed 0)")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out images (seed 1) for the accuracy")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE.parent.parent / "unioncam" / "models" / "weights" / "shapes_cnn.pt"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    x, y, _ = make_dataset(seed=0, n=args.train)
    xv, yv, _ = make_dataset(seed=1, n=args.heldout)
    print(f"data: {len(x)} train, {len(xv)} held out, {time.time() - t0:.1f}s", flush=True)

    model = ShapesCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(x) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = x[idx], y[idx]
            # Flips keep the class (every shape is flip-invariant) and double the variety for free.
            if torch.rand(1, generator=g).item() < 0.5:
                xb = xb.flip(-1)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        acc = evaluate(model, xv, yv)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / total:.4f} train acc {correct / total:.4f} "
            f"held-out acc {acc:.4f}  ({time.time() - t0:.0f}s)",
            flush=True,
        )

    acc = evaluate(model, xv, yv)
    out = Path(args.out)
    torch.save(model.state_dict(), out)
    info = {
        "heldout_accuracy": acc,
        "heldout": {"seed": 1, "n": args.heldout},
        "train": {
            "seed": 0,
            "n": args.train,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "threads": args.threads,
            "seconds": round(time.time() - t0, 1),
        },
        "classes": list(SHAPE_CLASSES),
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": "PYTHONPATH=. python benchmarks/groundtruth/train.py",
    }
    (HERE / "shapes_cnn.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


@torch.no_grad()
def evaluate(model: ShapesCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


if __name__ == "__main__":
    main()
