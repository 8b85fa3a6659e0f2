"""Unknown detection on held-out classes: every score against the plain "max softmax < 0.95" rule, same model.

Fashion-MNIST (Debian dataset-fashion-mnist, fetched with apt-get download when not installed): train itfits
with its defaults on KNOWN classes, then evaluate on test images of the known classes and of HELD_OUT classes.

    python bench/unknown_scores.py [--per-class 150] [--epochs 3] [--size 64] [--seeds 0]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.evaluate import evaluate  # noqa: E402
from pipelines.run import FitConfig, fit  # noqa: E402

NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
KNOWN = ["tshirt", "trouser", "dress", "sandal", "bag", "ankle_boot"]
HELD_OUT = ["pullover", "coat", "shirt", "sneaker"]
DEB_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist(tmp: Path) -> Path:
    if DEB_DIR.exists():
        return DEB_DIR
    subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp, check=True, capture_output=True)
    deb = next(tmp.glob("dataset-fashion-mnist_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(tmp / "root")], check=True)
    return tmp / "root" / DEB_DIR.relative_to("/")


def write_split(src: Path, split: str, classes, per_class: int, out: Path, seed: int):
    images = np.frombuffer(gzip.open(src / f"{split}-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(src / f"{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    rng = np.random.default_rng(seed)
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in rng.choice(np.flatnonzero(labels == NAMES.index(name)), per_class, replace=False):
            Image.fromarray(images[i]).save(out / name / f"{i:05d}.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/bench_unknown")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = fashion_mnist(tmp)
        for seed in map(int, args.seeds.split(",")):
            d = tmp / f"seed{seed}"
            write_split(src, "train", KNOWN, args.per_class, d / "train", seed)
            write_split(src, "t10k", KNOWN, args.test_per_class, d / "test", seed)
            write_split(src, "t10k", HELD_OUT, args.test_per_class, d / "unknown", seed)
            run = Path(args.out) / f"seed{seed}"
            fit(FitConfig(data=str(d / "train"), out=str(run), epochs=args.epochs, size=args.size, seed=seed),
                log=lambda *a: None)
            m = evaluate(run / "model", d / "test", unknown=d / "unknown", out=run / "evaluate")
            results.append(m)
            print(f"seed {seed}: accuracy {m['accuracy']:.3f}, score {m['unknown_rule']['score']}")
    print(f"\nKnown {KNOWN} vs held-out {HELD_OUT}; {args.per_class}/class train, {args.test_per_class}/class test, "
          f"efficientnet_lite0 {args.size}px, {args.epochs} epochs, seeds {args.seeds}")
    print("| score | AUROC | FPR at 95% TPR | correct known accepted at the plain rule's unknown acceptance |\n|---|---|---|---|")
    for name in results[0]["scores"]:
        vals = [np.mean([r["scores"][name][k] for r in results])
                for k in ("auroc", "fpr95", "correct_accepted_at_plain_unknown_rate")]
        print(f"| {name} | {vals[0]:.3f} | {vals[1]:.3f} | {vals[2]:.3f} |")
    print("\n| rule | correct known accepted | unknown accepted | accuracy on accepted |\n|---|---|---|---|")
    for key, label in [("unknown_rule", "itfits default (auto threshold, keep 0.95)"), ("plain_rule", "max softmax >= 0.95")]:
        vals = [np.mean([r[key][k] for r in results]) for k in ("correct_accepted", "unknown_accepted", "accuracy_on_accepted")]
        print(f"| {label} | {vals[0]:.3f} | {vals[1]:.3f} | {vals[2]:.3f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
