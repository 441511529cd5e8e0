"""Build the small real-data fixture the tests use, so that they need nothing outside this
repository:

    python tests/make_fixtures.py --source ../shared/data

It takes the first N / n_classes images of each class from each split of the real arrays (some
sources are sorted by class) and writes them, in their source order, in the same `.npz` format
(x uint8 N x H x W x C, y int64, classes) to tests/fixtures/data/<name>/<split>.npz.
"""
import argparse
import os

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "data")
# (dataset, split, images): enough for a 16-image batch, a 50-image validation set, a judge that
# learns well above chance, and OOD sets of a few hundred.
SIZES = [("mnist", "train", 1200), ("mnist", "test", 400),
         ("fashion_mnist", "train", 100), ("fashion_mnist", "test", 200),
         ("cifar10", "train", 80), ("cifar10", "test", 40)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=os.path.join("..", "shared", "data"),
                   help="folder of the full arrays, <name>/<split>.npz (default: %(default)s)")
    args = p.parse_args()
    for name, split, n in SIZES:
        with np.load(os.path.join(args.source, name, f"{split}.npz"), allow_pickle=False) as f:
            y, classes = f["y"].astype(np.int64), f["classes"]
            keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:n // len(classes)]
                                           for c in range(len(classes))]))
            x, y = f["x"][keep], y[keep]
        os.makedirs(os.path.join(OUT, name), exist_ok=True)
        path = os.path.join(OUT, name, f"{split}.npz")
        np.savez_compressed(path, x=x, y=y, classes=classes)
        print(f"{path}: {len(x)} images, per class {np.bincount(y, minlength=len(classes)).tolist()}, "
              f"{os.path.getsize(path) // 1024} KiB")


if __name__ == "__main__":
    main()
