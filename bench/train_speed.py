"""Training and prediction speed, measured side by side in one run (bench/BENCHMARKS.md).

    python bench/train_speed.py                      # efficientnet_lite0, 64 px, batches of 16, 3 rounds

Each round runs every variant once, each in a fresh process, in an order that rotates from round to round, so
background load falls on all of them alike; the table holds medians over rounds and the ratios between them.

Training (images/s of the unfrozen epochs, where all variants do the same work: forward, backward, step on
the whole network; the frozen head-only epoch of fine_tune is faster and left out of every variant):
  itfits fit      `itfits fit` as a user runs it (default workers, --precision as auto chose in this process)
                  images/s of its training loop from history.csv: files -> augmentation -> step, per epoch;
                  the whole command's wall time, start-up and calibration included, is reported beside it
  model only      the same backbone, size, batch, precision and memory format: a bare loop of forward, loss,
                  backward, AdamW step on tensors made beforehand
  fastai fp32     the plain fastai recipe: ImageDataLoaders.from_folder (Resize item transform, aug_transforms),
                  a Learner on the same model, fine_tune, fp32, fastai's defaults
itfits, model only and bare model run with pipelines.runtime.reuse_freed_memory, as the `itfits` command does;
the plain fastai variants as fastai comes.
Prediction (images/s over --predict-images files; interpreter start-up excluded for all three):
  itfits predict  pipelines.predict.predict + write_predictions on the bundle that round's fit wrote
  itfits predict, no reference  the same bundle without its pretrained reference body (combined score): what
                  the default unknown score costs
  itfits predict, whole reference  the same bundle with the whole pretrained body as its reference (bundles
                  before the shared stem): what sharing the frozen stages saves
  bare model      forward passes on tensors made beforehand, batches of 64, the model as predict runs it (its
                  precision, memory format, BatchNorms folded: predict.fast_path)
  fastai predict  learn.predict(file) per file, the loop fastai's docs show
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "fashion"
LR = 3e-3


# ---- workers: each runs in its own process and prints one JSON line -------------------------------------------

def _model_and_precision(arch: str, size: int, precision: str, weights: str):
    import torch
    from pipelines.backbones import create_backbone, get_spec
    from pipelines.precision import resolve_precision
    model = create_backbone(arch, num_classes=4, weights=weights)
    cl = get_spec(arch).channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    return model, resolve_precision(precision, arch=arch, size=size), cl


def worker_model_only(a) -> dict:
    """Bare training steps: forward, loss, backward, AdamW step on tensors made beforehand."""
    import torch
    model, precision, cl = _model_and_precision(a.arch, a.size, a.precision, a.weights)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.bs, 3, a.size, a.size)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    y = torch.randint(0, 4, (a.bs,))

    def step():
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    n = max(6, a.steps)
    t = time.perf_counter()
    for _ in range(n):
        step()
    return {"images_per_s": n * a.bs / (time.perf_counter() - t), "precision": precision.name}


class _Timer:
    """fastai callback: training images and seconds of the unfrozen epochs."""

    def __new__(cls):
        from fastai.callback.core import Callback
        from fastai.torch_core import find_bs

        class Timer(Callback):
            order = 100

            def before_fit(self):
                self.__dict__.setdefault("images", 0)
                self.__dict__.setdefault("seconds", 0.0)

            def before_train(self):
                self.t = time.perf_counter()

            def after_batch(self):
                if self.training and not self.opt.frozen_idx:
                    self.images += find_bs(self.yb)

            def after_train(self):
                if not self.opt.frozen_idx:
                    self.seconds += time.perf_counter() - self.t

        return Timer()


def worker_fastai(a) -> dict:
    """The plain fastai recipe, fp32, fastai's defaults (its DataLoaders' worker processes included)."""
    import fastai.callback.schedule  # noqa: F401
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.vision.data import ImageDataLoaders
    from fastai.data.transforms import Normalize
    from pipelines.backbones import create_backbone, get_spec
    from pipelines.learners import body_head_split
    spec = get_spec(a.arch)
    set_seed(42)
    dls = ImageDataLoaders.from_folder(DATA, valid_pct=0.2, seed=42, item_tfms=Resize(a.size), bs=a.bs,
                                       batch_tfms=[*aug_transforms(), Normalize.from_stats(spec.mean, spec.std)])
    learn = Learner(dls, create_backbone(a.arch, num_classes=len(dls.vocab), weights=a.weights),
                    loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=body_head_split)
    timer = _Timer()
    learn.fine_tune(a.epochs, base_lr=LR, freeze_epochs=1, cbs=timer)
    return {"images_per_s": timer.images / timer.seconds}


def worker_predict(a, bundle=None) -> dict:
    """itfits' prediction pipeline in process: files -> rows -> CSV."""
    from pipelines.bundle import load_bundle
    from pipelines.predict import fast_path, predict, write_predictions
    from pipelines.images import ImagePreprocessing
    bundle = bundle or load_bundle(a.bundle)
    chosen = fast_path(bundle, ImagePreprocessing.from_json(bundle.meta["preprocessing"]))["precision"].name
    out = Path(a.tmp) / "predictions.csv"
    # warm-up as the bare loop's: one full batch (the first batches of a shape build its kernels and map memory)
    list(predict(bundle, [str(p) for p in sorted(Path(a.inputs).rglob("*.png"))[:64]]))
    t = time.perf_counter()
    counts = write_predictions(predict(bundle, [a.inputs]), out)
    return {"images_per_s": counts["files"] / (time.perf_counter() - t), "precision": chosen}


def worker_predict_no_reference(a) -> dict:
    """worker_predict on the same bundle as itfits wrote them before the pretrained reference body: its model
    alone, the combined score (what the default unknown score costs at prediction)."""
    from dataclasses import replace
    import numpy as np
    from pipelines.bundle import load_bundle
    bundle = load_bundle(a.bundle)
    none = np.zeros((0, 0), np.float32)
    stats = replace(bundle.calibration.stats, ref_means=none, ref_precision=none)
    calibration = replace(bundle.calibration, score="combined", threshold=0.0, stats=stats)
    return worker_predict(a, replace(bundle, calibration=calibration, scoring_model=bundle.model))


def worker_predict_whole_reference(a) -> dict:
    """worker_predict on the same bundle with the whole pretrained body as its reference, as bundles were before the
    shared stem (features.WithReference): what sharing the frozen stages saves."""
    from dataclasses import replace
    from pipelines.backbones import create_body, get_spec
    from pipelines.bundle import load_bundle
    from pipelines.features import WithReference
    bundle = load_bundle(a.bundle)
    whole = WithReference(bundle.model, create_body(get_spec(bundle.meta["backbone"]))[0]).eval()
    return worker_predict(a, replace(bundle, scoring_model=whole))


def worker_bare_inference(a) -> dict:
    import torch
    from pipelines.bundle import load_bundle
    from pipelines.images import ImagePreprocessing
    from pipelines.predict import fast_path
    bundle = load_bundle(a.bundle)
    fast = fast_path(bundle, ImagePreprocessing.from_json(bundle.meta["preprocessing"]))
    model = fast["model"]
    x = torch.randn(64, 3, a.size, a.size)
    if fast["channels_last"]:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    n = max(2, a.predict_images // 64)
    with torch.inference_mode(), fast["precision"].autocast():
        model(x)
        t = time.perf_counter()
        for _ in range(n):
            model(x)
    return {"images_per_s": n * 64 / (time.perf_counter() - t), "precision": fast["precision"].name}


def worker_fastai_predict(a) -> dict:
    """fastai's per-item loop: learn.predict(file) on a Learner with the same model and fastai DataLoaders."""
    import fastai.callback.progress  # noqa: F401  fastai @patches Learner.no_bar here
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.vision.augment import Resize
    from fastai.vision.data import ImageDataLoaders
    from fastai.data.transforms import Normalize
    from pipelines.bundle import load_bundle
    bundle = load_bundle(a.bundle)
    prep = bundle.meta["preprocessing"]
    dls = ImageDataLoaders.from_folder(DATA, valid_pct=0.2, seed=42, item_tfms=Resize(a.size), bs=a.bs,
                                       batch_tfms=[Normalize.from_stats(prep["mean"], prep["std"])], num_workers=0)
    learn = Learner(dls, bundle.model, loss_func=CrossEntropyLossFlat())
    files = sorted(Path(a.inputs).rglob("*.png"))[: a.fastai_predict_images]
    learn.predict(files[0])
    t = time.perf_counter()
    with learn.no_bar():
        for f in files:
            learn.predict(f)
    return {"images_per_s": len(files) / (time.perf_counter() - t)}


WORKERS = {"model_only": worker_model_only, "fastai_fp32": worker_fastai, "itfits_predict": worker_predict,
           "itfits_predict_no_reference": worker_predict_no_reference,
           "itfits_predict_whole_reference": worker_predict_whole_reference,
           "bare_inference": worker_bare_inference, "fastai_predict": worker_fastai_predict}


# ---- the driver ----------------------------------------------------------------------------------------------

def _run_worker(name: str, a, **extra) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--arch", a.arch, "--size", str(a.size),
            "--bs", str(a.bs), "--epochs", str(a.epochs), "--precision", a.precision, "--steps", str(a.steps),
            "--weights", a.weights,
            "--predict-images", str(a.predict_images), "--fastai-predict-images", str(a.fastai_predict_images)]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_fit(a, run: Path) -> dict:
    import polars as pl
    t = time.perf_counter()
    args = ["fit", str(DATA), "--out", str(run), "--arch", a.arch, "--weights", a.weights, "--epochs", str(a.epochs),
            "--freeze-epochs", "1", "--size", str(a.size), "--bs", str(a.bs), "--lr", str(LR),
            "--precision", a.precision]
    proc = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"itfits fit failed:\n{proc.stderr[-3000:]}")
    h = pl.read_csv(run / "history.csv")
    unfrozen = h.filter(pl.col("phase") == "unfrozen")
    seconds = (unfrozen["images"] / unfrozen["images_per_s"]).sum()
    return {"images_per_s": unfrozen["images"].sum() / seconds,
            "wall_images_per_s": h["images"].sum() / wall, "wall_s": wall}


def _inputs(tmp: Path, n: int) -> Path:
    """n image files for prediction: copies of data/fashion, class folders kept."""
    files = sorted(DATA.rglob("*.png"))
    out = tmp / "inputs"
    for i in range(n):
        src = files[i % len(files)]
        dst = out / src.parent.name / f"{i:05d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--weights", default="auto", help="none for backbones whose weights need the hub (speed only)")
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="unfrozen epochs of each fine_tune (after 1 frozen)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="auto", help="auto: resolved once here and passed to every variant")
    p.add_argument("--steps", type=int, default=36, help="steps of the model-only loop")
    p.add_argument("--predict-images", type=int, default=960)
    p.add_argument("--fastai-predict-images", type=int, default=96)
    p.add_argument("--threads", type=int, help="torch threads of every variant (OMP_NUM_THREADS); default: torch's "
                   "own (all cores). On a machine others load too, 1 keeps oversubscription from swamping the ratios")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    if a.threads:  # before torch is imported here, and inherited by every variant's process
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    if a.worker:
        if not a.worker.startswith("fastai"):  # as `itfits` runs (app.cli.main); the plain fastai recipes as they come
            from pipelines.runtime import reuse_freed_memory
            reuse_freed_memory()
        print(json.dumps(WORKERS[a.worker](a)))
        return

    from pipelines.precision import resolve_precision
    chosen = resolve_precision(a.precision, arch=a.arch, size=a.size)
    a.precision = chosen.name  # every variant trains in the same precision
    print(f"{a.arch} ({a.weights} weights) {a.size}px bs {a.bs}, 1+{a.epochs} epochs on {DATA.relative_to(REPO)}; "
          f"precision "
          f"{chosen.name} ({chosen.reason}); {os.cpu_count()} cores, torch threads {a.threads or 'default'}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = _inputs(tmp, a.predict_images)
        train_names = ["itfits_fit", "model_only", "fastai_fp32"]
        predict_names = ["itfits_predict", "itfits_predict_no_reference", "itfits_predict_whole_reference",
                         "bare_inference", "fastai_predict"]
        for r in range(a.rounds):
            run = tmp / f"run{r}"
            order = train_names[r % 3:] + train_names[: r % 3]
            for name in order:
                res = _run_fit(a, run) if name == "itfits_fit" else _run_worker(name, a)
                results.setdefault(name, []).append(res)
                print(f"round {r + 1} {name}: {res['images_per_s']:.1f} images/s", flush=True)
            k = r % len(predict_names)
            order = predict_names[k:] + predict_names[:k]
            for name in order:
                res = _run_worker(name, a, bundle=run / "model", inputs=inputs, tmp=tmp)
                results.setdefault(name, []).append(res)
                print(f"round {r + 1} {name}: {res['images_per_s']:.1f} images/s", flush=True)
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in results.items()}
    wall = statistics.median(x["wall_images_per_s"] for x in results["itfits_fit"])
    print(f"\nmedians over {a.rounds} rounds (load average now {os.getloadavg()[0]:.1f})")
    print("| variant | images/s | ratio | target |\n|---|---|---|---|")
    rows = [("itfits fit (training loop)", "itfits_fit", None, None),
            ("model-only training loop", "model_only", "itfits_fit", 0.85),
            ("plain fastai fp32 recipe", "fastai_fp32", "itfits_fit", 1.8),
            ("itfits predict", "itfits_predict", None, None),
            ("itfits predict without the reference body (combined score, bundles before it)",
             "itfits_predict_no_reference", "itfits_predict", None),
            ("itfits predict with the whole reference body (bundles before the shared stem)",
             "itfits_predict_whole_reference", "itfits_predict", None),
            ("bare model inference (with the reference body)", "bare_inference", "itfits_predict", 0.85),
            ("fastai learn.predict loop", "fastai_predict", "itfits_predict", 10)]
    for label, key, ours, target in rows:
        ratio = f"itfits {med[ours] / med[key]:.2f}x" if ours else ""
        print(f"| {label} | {med[key]:.1f} | {ratio} | {'>= ' + str(target) + 'x' if target else ''} |")
    print(f"| itfits fit, whole command (start-up, lr, calibration, bundle) | {wall:.1f} | | |")
    print(f"prediction precision: {results['itfits_predict'][0].get('precision')}")


if __name__ == "__main__":
    main()
