"""Prediction through onnxruntime (an `itfits export --format onnx` file) against the torch path, side by side on
the same files and the same bundle (bench/BENCHMARKS.md, "Export: onnxruntime against torch").

    OMP_NUM_THREADS=1 python bench/export_speed.py                # 64 px, 3 rounds
    OMP_NUM_THREADS=1 python bench/export_speed.py --size 128

A bundle is trained once (`itfits fit data/fashion`, one epoch: speed does not depend on accuracy) and exported.
Each round then times, in an order that rotates from round to round so that background load falls on all alike:
  predict, torch   pipelines.predict.predict on the bundle, every row consumed (what `itfits predict` runs:
                   decoding, the folded model in the precision `auto` picks, the unknown score)
  predict, onnx    the same on the exported .onnx file (onnxruntime's CPU provider, as many threads as torch)
  model, torch     forward passes on a batch of 64 made beforehand: the model as predict runs it (fast_path)
  model, onnx      the same batch through the onnxruntime session
The files are data/fashion_test and data/fashion_unknown, repeated to --files. The table holds medians over
rounds (images/s) and the onnx / torch ratios. Interpreter start-up and loading are left out of every variant.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _images_per_s(fn, n: int) -> float:
    fn()  # warm-up: the first call of a shape builds kernels and maps memory
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--files", type=int, default=600, help="files per prediction pass (the 100 sample files repeated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8, help="batches of 64 per model-only pass")
    a = ap.parse_args()

    import torch
    from pipelines.bundle import load_bundle
    from pipelines.export import export_bundle, load_exported
    from pipelines.images import ImagePreprocessing
    from pipelines.predict import PredictConfig, fast_path, predict

    tmp = Path(tempfile.mkdtemp(prefix="export_speed."))
    run = tmp / "run"
    subprocess.run([sys.executable, "-m", "app.cli", "fit", str(REPO / "data" / "fashion"), "--out", str(run),
                    "--epochs", "1", "--freeze-epochs", "0", "--size", str(a.size), "--lr", "3e-3", "--workers", "0"],
                   check=True, cwd=REPO, capture_output=True)
    export_bundle(run / "model", tmp / "model.onnx", fmt="onnx")
    bundle, exported = load_bundle(run / "model"), load_exported(tmp / "model.onnx")
    samples = sorted(str(p) for d in ("fashion_test", "fashion_unknown") for p in (REPO / "data" / d).rglob("*.png"))
    files = (samples * (a.files // len(samples) + 1))[:a.files]
    config = PredictConfig(num_workers=0)
    fast = fast_path(bundle, ImagePreprocessing.from_json(bundle.meta["preprocessing"]))
    x = torch.randn(64, 3, a.size, a.size)
    xt = x.contiguous(memory_format=torch.channels_last) if fast["channels_last"] else x
    if fast["channels_last"]:
        fast["model"].to(memory_format=torch.channels_last)

    def torch_model():
        with torch.inference_mode(), fast["precision"].autocast():
            for _ in range(a.batches):
                fast["model"](xt)

    def onnx_model():
        for _ in range(a.batches):
            exported.model(x)

    variants = {
        "predict, torch": (lambda: sum(1 for _ in predict(bundle, files, config)), len(files)),
        "predict, onnx": (lambda: sum(1 for _ in predict(exported, files, config)), len(files)),
        "model, torch": (torch_model, 64 * a.batches),
        "model, onnx": (onnx_model, 64 * a.batches),
    }
    names = list(variants)
    results = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            results[n].append(_images_per_s(*variants[n]))
    med = {n: statistics.median(v) for n, v in results.items()}
    print(f"efficientnet_lite0 at {a.size} px, {a.files} files, {a.rounds} rounds, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, precision {fast['precision'].name}), onnxruntime "
          f"{__import__('onnxruntime').__version__}")
    print("| variant | images/s (median) | rounds |\n|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:.0f} | {', '.join(f'{v:.0f}' for v in results[n])} |")
    print(f"onnx / torch: predict {med['predict, onnx'] / med['predict, torch']:.2f}x, "
          f"model {med['model, onnx'] / med['model, torch']:.2f}x")


if __name__ == "__main__":
    main()
