"""Rebuild data/fashion* from Debian's dataset-fashion-mnist (MIT licence).

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fm
    python data/make_fashion_sample.py /tmp/fm/usr/share/datasets/fashion-mnist

Writes 28x28 grayscale PNGs: fashion/ (known classes, from the training split), fashion_test/ (known
classes, from the test split) and fashion_unknown/ (held-out classes, from the test split).
"""
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
KNOWN = ["tshirt", "trouser", "sneaker", "bag"]
HELD_OUT = ["sandal", "pullover"]


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def write(images, labels, classes, per_class, out: Path, seed: int):
    rng = np.random.default_rng(seed)
    for name in classes:
        idx = np.flatnonzero(labels == NAMES.index(name))
        for i in rng.choice(idx, per_class, replace=False):
            (out / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(out / name / f"{name}_{i:05d}.png")


def main(src: str):
    src, here = Path(src), Path(__file__).parent
    for split, out in [("train", "fashion"), ("t10k", "fashion_test")]:
        images = read_idx(src / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = read_idx(src / f"{split}-labels-idx1-ubyte.gz", 8)
        write(images, labels, KNOWN, 60 if split == "train" else 15, here / out, seed=0)
        if split == "t10k":
            write(images, labels, HELD_OUT, 20, here / "fashion_unknown", seed=1)


if __name__ == "__main__":
    main(sys.argv[1])
