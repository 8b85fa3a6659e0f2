"""What the data check costs at fit (issue 19 item 4): its duplicate pass and mislabel pass against the whole run.

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fm
    OMP_NUM_THREADS=1 python bench/check_cost.py /tmp/fm/usr/share/datasets/fashion-mnist [PER_CLASS ...]

For each PER_CLASS (default 240 and 1200): that many training images of each of the 10 Fashion-MNIST classes as
28-px PNGs, then `itfits fit` on them in-process (--size 32, 1 frozen + 1 unfrozen epoch, --lr given, no lr_find),
and the check's seconds from run.json beside the run's. Then the duplicate pass's pair search alone on 20,000 and
50,000 random thumbnails (its all-pairs part grows with the square of the file count).
"""
from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.check import THUMB, near_pairs  # noqa: E402
from pipelines.logs import set_log_mode  # noqa: E402
from pipelines.run import FitConfig, fit  # noqa: E402

NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def write_set(idx: Path, per_class: int, out: Path) -> None:
    with gzip.open(idx / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(idx / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for k, name in enumerate(NAMES):
        (out / name).mkdir(parents=True)
        for i in np.flatnonzero(labels == k)[:per_class]:
            Image.fromarray(images[i]).save(out / name / f"{i:05d}.png")


def main(idx: Path, sizes: list[int]) -> None:
    set_log_mode("quiet")  # the table only: no epoch lines or progress between its rows
    print("| files | duplicate pass s | mislabel pass s | check s | fit s | check share |")
    print("|---|---|---|---|---|---|")
    for per_class in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data, run = Path(tmp) / "data", Path(tmp) / "run"
            write_set(idx, per_class, data)
            fit(FitConfig(data=str(data), out=str(run), size=32, epochs=1, freeze_epochs=1, lr=3e-3, bs=32,
                          num_workers=0), log=lambda *a: None)
            summary = json.loads((run / "run.json").read_text())
            sec, total = summary["check"]["seconds"], summary["results"]["seconds"]
            check = sec["hashes"] + sec["mislabel"]
            print(f"| {10 * per_class} | {sec['hashes']:.2f} | {sec['mislabel']:.2f} | {check:.2f} | {total:.1f} | "
                  f"{check / total:.1%} |")
    for n in (20_000, 50_000):
        thumbs = np.random.default_rng(0).integers(0, 256, (n, THUMB, THUMB), dtype=np.uint8)
        t0 = time.perf_counter()
        near_pairs(thumbs, np.ones(n, bool))
        print(f"pair search alone, {n} files: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(a) for a in sys.argv[2:]] or [240, 1200])
