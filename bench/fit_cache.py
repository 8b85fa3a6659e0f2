"""Frozen features computed once (issue 31 items 1 and 5), side by side in one run: on suite sets, the fit time and
test accuracy of (a) today's path (the stem computed at every step: feature_cache.CACHE_VIEWS = 0), (b) the cached
path with K augmented views per training item, and (d) one `itfits predict` pass over the same training files (the
physical limit: the frozen stages computed once). Variants run one after another per set and seed, so a shared
machine's load hits them alike.

    python bench/suite_sets.py --sets fashion,glyphs,icons
    OMP_NUM_THREADS=1 python bench/fit_cache.py --sets fashion,glyphs,icons --size 64 --seeds 0 --views 0,1,2,3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_sets  # noqa: E402
from pipelines import feature_cache  # noqa: E402
from pipelines.bundle import load_bundle  # noqa: E402
from pipelines.predict import PredictConfig, predict  # noqa: E402
from pipelines.run import FitConfig, fit  # noqa: E402


def fit_variant(set_dir: Path, run: Path, *, views: int, size: int, seed: int) -> dict:
    """Fit with the defaults and `views` cached views (0: today's path); seconds of fit() and test accuracy."""
    cache = run / "fit_cache.json"
    if cache.exists():
        return {**json.loads(cache.read_text()), "epochs_s": epoch_seconds(run)}
    feature_cache.CACHE_VIEWS = views
    start = time.perf_counter()
    summary = fit(FitConfig(data=str(set_dir / "fit"), out=str(run), size=size, seed=seed), log=lambda *a, **k: None)
    seconds = time.perf_counter() - start
    bundle = load_bundle(run / "model")
    rows = list(predict(bundle, [str(set_dir / "test")], PredictConfig(num_workers=0)))
    correct = [r["top1"] == Path(r["path"]).parent.name for r in rows]
    resolved = summary["resolved"]
    out = {"views": views, "fit_s": round(seconds, 1), "test_accuracy": sum(correct) / len(correct),
           "valid_accuracy": summary["results"]["valid_accuracy"], "epochs": resolved["epochs"],
           "n_train": resolved["n_train"]}
    run.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return {**out, "epochs_s": epoch_seconds(run)}


def epoch_seconds(run: Path) -> float:
    """Seconds of the fit's epochs (history.csv): the part the cache changes, lr_find and calibration aside."""
    import polars as pl
    return round(float(pl.read_csv(run / "history.csv")["seconds"].sum()), 1)


def predict_pass(set_dir: Path, bundle_dir: Path) -> float:
    """Seconds of one prediction pass over the training files with a trained bundle (loaded beforehand)."""
    bundle = load_bundle(bundle_dir)
    start = time.perf_counter()
    rows = list(predict(bundle, [str(set_dir / "fit" / "train")], PredictConfig(num_workers=0)))
    assert rows
    return round(time.perf_counter() - start, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="fashion,glyphs,icons")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--views", default="0,1,2,3", help="0: today's path (no cache)")
    ap.add_argument("--out", default="runs/fit_cache")
    args = ap.parse_args()
    views = [int(v) for v in args.views.split(",")]
    results = []
    for name in args.sets.split(","):
        set_dir = suite_sets.build(name)
        for seed in map(int, args.seeds.split(",")):
            for k in views:
                r = fit_variant(set_dir, Path(args.out) / f"{name}-{args.size}-s{seed}-k{k}", views=k, size=args.size,
                                seed=seed)
                results.append({"set": name, "seed": seed, **r})
                print(json.dumps(results[-1]), flush=True)
            p = predict_pass(set_dir, Path(args.out) / f"{name}-{args.size}-s{seed}-k{views[0]}" / "model")
            results.append({"set": name, "seed": seed, "views": "predict", "fit_s": p})
            print(json.dumps(results[-1]), flush=True)
    names = [f"{'today' if k == 0 else f'K={k}'} acc / fit s / epochs s" for k in views]
    print("\n| set | seed | " + " | ".join(names) + " | predict pass s |")
    print("|---|---|" + "---|" * (len(views) + 1))
    for name in args.sets.split(","):
        for seed in map(int, args.seeds.split(",")):
            rs = {r["views"]: r for r in results if r["set"] == name and r["seed"] == seed}
            cells = [f"{rs[k]['test_accuracy']:.3f} / {rs[k]['fit_s']:.0f} / {rs[k]['epochs_s']:.0f}" for k in views]
            print(f"| {name} | {seed} | " + " | ".join(cells) + f" | {rs['predict']['fit_s']:.0f} |")


if __name__ == "__main__":
    main()
