"""Write the ground-truth benchmark's images in the layout ``unioncam evaluate`` reads.

    PYTHONPATH=. python benchmarks/groundtruth/make_data.py data/shapes-heldout --seed 1 --n 500

OUT/images/<k>_<class>/<seed>_<index>.png, OUT/masks/<seed>_<index>.png, OUT/annotations/<seed>_<index>.xml.
Seed 0 is the training split; seed 1 is held out (the model never saw it).
"""

import argparse

from unioncam.eval.groundtruth import write_folder

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    print(write_folder(a.out, a.seed, a.n, a.size))
