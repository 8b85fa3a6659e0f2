"""Rebuild data/multilabel* from Debian's dataset-fashion-mnist (MIT licence): a small multi-label image set.

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fm
    python data/make_multilabel_sample.py /tmp/fm/usr/share/datasets/fashion-mnist

Each 64x64 grayscale PNG holds one to three Fashion-MNIST items of different classes among data/fashion's four
(tshirt, trouser, sneaker, bag), each in its own quadrant with a few pixels of jitter; a few hold none (faint
noise only, an empty labels cell: an example of none of the classes). Writes multilabel/ (training split items)
and multilabel_test/ (test split items), each with images/ and labels.csv (path,labels): the training table
separates labels with a space, the test table with ';' (both forms fit and evaluate read). Seeded: running it
again writes the same files.
"""
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
CLASSES = ["tshirt", "trouser", "sneaker", "bag"]  # data/fashion's classes
ITEMS = (1, 2, 3)  # items per picture, drawn with ITEMS_P
ITEMS_P = (0.25, 0.45, 0.30)
SIDE, CELL, JITTER = 64, 32, 4  # picture side, quadrant side, largest offset of an item (28 px) in its quadrant


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def compose(images, labels, rng) -> tuple[np.ndarray, list[str]]:
    """One picture: k items of different classes in k of the four quadrants; (pixels, sorted class names)."""
    canvas = np.zeros((SIDE, SIDE), np.uint8)
    k = rng.choice(ITEMS, p=ITEMS_P)
    names = sorted(rng.choice(CLASSES, k, replace=False).tolist())
    for name, cell in zip(names, rng.permutation(4)[:k]):
        item = images[rng.choice(np.flatnonzero(labels == NAMES.index(name)))]
        y, x = (cell // 2) * CELL + rng.integers(0, JITTER + 1), (cell % 2) * CELL + rng.integers(0, JITTER + 1)
        canvas[y:y + 28, x:x + 28] = np.maximum(canvas[y:y + 28, x:x + 28], item)
    return canvas, names


def write(images, labels, out: Path, *, n: int, n_empty: int, separator: str, seed: int):
    rng = np.random.default_rng(seed)
    if (out / "images").exists():  # the same files each time, none left from an earlier version
        shutil.rmtree(out / "images")
    (out / "images").mkdir(parents=True)
    rows = []
    for i in range(n + n_empty):
        if i < n:
            pixels, names = compose(images, labels, rng)
        else:  # none of the classes: faint noise, so that no two are the same file
            pixels, names = rng.integers(0, 12, (SIDE, SIDE), dtype=np.uint8), []
        name = f"images/ml_{i:03d}.png"
        Image.fromarray(pixels, "L").save(out / name, optimize=True)
        rows.append(f"{name},{separator.join(names)}")
    (out / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")


def main(src: str):
    src, here = Path(src), Path(__file__).parent
    for split, out, n, n_empty, separator, seed in [("train", "multilabel", 192, 8, " ", 2),
                                              ("t10k", "multilabel_test", 44, 4, ";", 3)]:
        images = read_idx(src / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = read_idx(src / f"{split}-labels-idx1-ubyte.gz", 8)
        write(images, labels, here / out, n=n, n_empty=n_empty, separator=separator, seed=seed)


if __name__ == "__main__":
    main(sys.argv[1])
