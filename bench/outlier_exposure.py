"""Outlier exposure (`fit --unknown EX --outlier-exposure`) against the same examples used only to choose the
score and threshold (`fit --unknown EX`), and against no examples (the defaults), on the sets of
bench/suite_sets.py. EX holds K files of every held-out class (near and far); the unknowns scored are the
held-out files that are not in EX. Each bundle is measured as `itfits predict` runs it: its shipped score and
threshold give AUROC (near, far), the share of correctly classified known test files kept and of unknowns rejected.

    python bench/outlier_exposure.py --seeds 0,1 --variants unknown,exposure

Results: RUNS/summary.json and markdown tables on stdout (bench/BENCHMARKS.md keeps them with the command).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_sets  # noqa: E402
from pipelines.bundle import load_bundle  # noqa: E402
from pipelines.predict import PredictConfig, predict  # noqa: E402
from pipelines.sources import AUDIO_EXTS, IMAGE_EXTS  # noqa: E402
from pipelines.training import FitConfig, fit  # noqa: E402
from pipelines.unknown import auroc  # noqa: E402

VARIANTS = {"defaults": {}, "unknown": {"unknown": True}, "exposure": {"unknown": True, "outlier_exposure": True}}


def split_held_out(set_dir: Path, exposure: Path, k: int, seed: int) -> dict[str, list[str]]:
    """Links to K seeded files of every near and far class in `exposure`/<kind>_<class>/; returns the held-out
    files left for scoring, by kind."""
    exts = AUDIO_EXTS if set_dir.name in suite_sets.AUDIO_SETS else IMAGE_EXTS
    rest = {}
    rng = np.random.default_rng(seed)
    for kind in ("near", "far"):
        rest[kind] = []
        for cls in sorted(d for d in (set_dir / kind).iterdir() if d.is_dir()):
            paths = sorted(str(p) for p in cls.rglob("*") if p.suffix.lower() in exts)
            chosen = set(rng.choice(len(paths), size=min(k, len(paths) - 1), replace=False).tolist())
            folder = exposure / f"{kind}_{cls.name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, p in enumerate(paths):
                if i in chosen:
                    link = folder / Path(p).name
                    if not link.exists():
                        link.symlink_to(p)
                else:
                    rest[kind].append(p)
    return rest


def measure(run: Path, set_dir: Path, rest: dict[str, list[str]]) -> dict:
    bundle = load_bundle(run / "model")
    exts = bundle.input_exts
    test = sorted(str(p) for p in (set_dir / "test").rglob("*") if p.suffix.lower() in exts)
    rows = {kind: list(predict(bundle, paths, PredictConfig(num_workers=0)))
            for kind, paths in {"test": test, **rest}.items()}
    truth = [Path(p).parent.name for p in test]
    correct = np.array([r["top1"] == t for r, t in zip(rows["test"], truth)])
    res = {"test_accuracy": float(correct.mean()), "score": bundle.calibration.score,
           "fit_seconds": json.loads((run / "run.json").read_text())["results"]["seconds"]}
    for kind in ("near", "far"):
        for name, col in (("shipped", "score"), ("confidence", "top1_prob")):
            res[f"auroc_{kind}_{name}"] = auroc(np.array([r[col] for r in rows["test"]]),
                                                np.array([r[col] for r in rows[kind]]))
        res[f"rejected_{kind}"] = float(np.mean([r["unknown"] for r in rows[kind]]))
    res["kept"] = float(np.mean([not r["unknown"] for r, c in zip(rows["test"], correct) if c]))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(suite_sets.SETS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--k", type=int, default=5, help="example files of each held-out class")
    ap.add_argument("--out", default="runs/outlier_exposure")
    args = ap.parse_args()
    root, results = Path(args.out), {}
    for name in args.sets.split(","):
        set_dir = suite_sets.build(name)
        for seed in map(int, args.seeds.split(",")):
            rest = split_held_out(set_dir, root / f"examples-{name}-seed{seed}", args.k, seed)
            for variant in args.variants.split(","):
                opts = VARIANTS[variant]
                run = root / f"{name}-{args.size}px-e{args.epochs}-seed{seed}-{variant}"
                if not (run / "model").is_dir():
                    fit(FitConfig(data=str(set_dir / "fit"), out=str(run), size=args.size, seed=seed,
                                  epochs=args.epochs, outlier_exposure=opts.get("outlier_exposure", False),
                                  unknown=str(root / f"examples-{name}-seed{seed}") if opts else None),
                        log=lambda *a: None)
                results[run.name] = {"set": name, "seed": seed, "variant": variant, **measure(run, set_dir, rest)}
                print(run.name, json.dumps(results[run.name]), flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(results, indent=1))
    report(results)


def report(results: dict) -> None:
    cols = ["test_accuracy", "auroc_near_shipped", "auroc_far_shipped", "auroc_near_confidence",
            "auroc_far_confidence", "kept", "rejected_near", "rejected_far"]
    sets = list(dict.fromkeys(r["set"] for r in results.values()))
    for kind, members in (("image", [s for s in sets if s not in suite_sets.AUDIO_SETS]),
                          ("audio", [s for s in sets if s in suite_sets.AUDIO_SETS])):
        if not members:
            continue
        print(f"\n### {kind} sets ({', '.join(members)}): mean over sets of the seeds' mean, and the worst set\n")
        print("| variant | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        for variant in dict.fromkeys(r["variant"] for r in results.values()):
            per_set = {s: {c: np.mean([r[c] for r in results.values() if r["set"] == s and r["variant"] == variant])
                           for c in cols} for s in members}
            cells = []
            for c in cols:
                vals = {s: v[c] for s, v in per_set.items()}
                worst = min(vals, key=vals.get)
                cells.append(f"{np.mean(list(vals.values())):.3f} (worst {vals[worst]:.3f} {worst})")
            print(f"| {variant} | " + " | ".join(cells) + " |")
        scores = [r["score"] for r in results.values() if r["set"] in members and r["variant"] != "defaults"]
        print("\nscores chosen on the examples: " + ", ".join(f"{s} x{scores.count(s)}" for s in sorted(set(scores))))


if __name__ == "__main__":
    main()
