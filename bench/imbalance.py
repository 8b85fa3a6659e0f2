"""--balance on a deliberately imbalanced split of Fashion-MNIST: minority recall and balanced accuracy of weights,
sampler and none, side by side (bench/BENCHMARKS.md, "Imbalanced classes").

    OMP_NUM_THREADS=1 python bench/imbalance.py --seeds 0,1          # about 6 minutes on 2 cores

Fashion-MNIST from Debian's dataset-fashion-mnist (MIT; unpacked by bench/suite_sets.py, never installed). Five
classes, CLASSES; training files: PER_CLASS of each, the MINORITY class at a tenth of that (drawn per seed from the
training split); test files: TEST_PER_CLASS of each class from the test split, the same for every run. Each
variant trains with `itfits fit --balance VARIANT` (32 px, 3 epochs after 1 frozen, fixed lr, fp32) and is scored
by `itfits evaluate` on the test files: accuracy, balanced accuracy (mean recall per class), the minority's recall
and precision. The table holds means over seeds, each seed's value after it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat"]
MINORITY = "pullover"  # looks like a coat: a class a model can give up on when it is rare
PER_CLASS, TEST_PER_CLASS = 150, 100
VARIANTS = ("none", "weights", "sampler")
FIT = ["--size", "32", "--epochs", "3", "--freeze-epochs", "1", "--lr", "3e-3", "--workers", "0", "--precision", "fp32"]


def _read(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer(gzip.open(src / f"{split}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(src / f"{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


def _write(images, labels, counts: dict[str, int], out: Path, rng) -> None:
    for name, n in counts.items():
        (out / name).mkdir(parents=True)
        for i in rng.choice(np.flatnonzero(labels == NAMES.index(name)), n, replace=False):
            Image.fromarray(images[i]).save(out / name / f"{i:05d}.png")


def _itfits(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"itfits {' '.join(map(str, args[:1]))} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    a = ap.parse_args()
    from suite_sets import unpack
    src = unpack("fashion") / "usr/share/datasets/fashion-mnist"
    tmp = Path(tempfile.mkdtemp(prefix="imbalance."))
    test = tmp / "test"
    _write(*_read(src, "t10k"), {c: TEST_PER_CLASS for c in CLASSES}, test, np.random.default_rng(1234))
    train_images, train_labels = _read(src, "train")
    rows = {v: [] for v in VARIANTS}
    for seed in map(int, a.seeds.split(",")):
        data = tmp / f"train{seed}"
        counts = {c: PER_CLASS // 10 if c == MINORITY else PER_CLASS for c in CLASSES}
        _write(train_images, train_labels, counts, data, np.random.default_rng(seed))
        for variant in VARIANTS:
            run = tmp / f"run_{variant}_{seed}"
            _itfits("fit", data, "--out", run, "--seed", seed, "--balance", variant, *FIT)
            _itfits("evaluate", run / "model", test, "--out", run / "evaluate", "--workers", "0")
            m = json.loads((run / "evaluate" / "metrics.json").read_text())
            chosen = json.loads((run / "run.json").read_text())["resolved"]["balance"]["method"]
            rows[variant].append({"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                                  "minority_recall": m["per_class"][MINORITY]["recall"],
                                  "minority_precision": m["per_class"][MINORITY]["precision"], "chosen": chosen})
            print(f"seed {seed} {variant}: {rows[variant][-1]}", flush=True)
    print(f"\nFashion-MNIST {', '.join(CLASSES)}; {PER_CLASS} training files per class, {MINORITY} "
          f"{PER_CLASS // 10}; {TEST_PER_CLASS} test files per class; seeds {a.seeds}")
    keys = ("minority_recall", "minority_precision", "balanced_accuracy", "accuracy")
    print("| --balance | " + " | ".join(k.replace("_", " ") for k in keys) + " |\n|---|" + "---|" * len(keys))
    for v in VARIANTS:
        cells = [f"{statistics.mean(r[k] for r in rows[v]):.3f} ({', '.join(f'{r[k]:.3f}' for r in rows[v])})"
                 for k in keys]
        print(f"| {v} | " + " | ".join(cells) + " |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
