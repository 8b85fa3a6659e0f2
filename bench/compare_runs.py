"""Side by side: suite runs of itfits with one default changed (backbone, data size, lr suggestion, epochs).

Each argument is NAME=RUNS, RUNS the --out folder of a bench/unknown_suite.py run (its summary.json). Per set,
the mean over seeds of test accuracy, seconds to train, and the AUROC of the default unknown score
(pretrained_mahalanobis, `maha++_ref_stage` in the suite) against near and far held-out classes; then the mean and
the worst set of each variant's difference from the first (the baseline), for image and audio sets.

    python bench/compare_runs.py lite0=runs/a lite1=runs/b lite2=runs/c

Results: markdown tables on stdout (bench/BENCHMARKS.md keeps them with the command).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_sets  # noqa: E402

DEFAULT_SCORE = "maha++_ref_stage"
METRICS = {"accuracy": ("test_accuracy", 3), "s": ("fit_seconds", 0)}


def per_set(runs: Path) -> dict[str, dict[str, float]]:
    """set -> {accuracy, s, near, far}: means over the seeds of one suite run folder."""
    summary = json.loads((runs / "summary.json").read_text())
    sets: dict[str, list[dict]] = {}
    for r in summary.values():
        sets.setdefault(r["set"], []).append(r)
    return {s: {"accuracy": float(np.mean([r["test_accuracy"] for r in rs])),
                "s": float(np.mean([r["fit_seconds"] for r in rs])),
                "near": float(np.mean([r["scores"][DEFAULT_SCORE]["auroc_near"] for r in rs])),
                "far": float(np.mean([r["scores"][DEFAULT_SCORE]["auroc_far"] for r in rs])),
                "n_train": int(np.mean([r.get("n_train", 0) for r in rs])), "seeds": len(rs)}
            for s, rs in sets.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=RUNS; the first is the baseline")
    args = ap.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    data = {name: per_set(Path(runs)) for name, runs in variants.items()}
    names = list(data)
    sets = [s for s in data[names[0]] if all(s in d for d in data.values())]
    cols = ("accuracy", "s", "near", "far")
    print("| set | " + " | ".join(f"{c} {n}" for c in cols for n in names) + " |\n|---|" + "---|" * len(cols) * len(names))
    for s in sets:
        print(f"| {s} | " + " | ".join(f"{data[n][s][c]:.{0 if c == 's' else 3}f}" for c in cols for n in names) + " |")
    base = names[0]
    for kind, members in (("image", [s for s in sets if s not in suite_sets.AUDIO_SETS]),
                          ("audio", [s for s in sets if s in suite_sets.AUDIO_SETS])):
        if not members:
            continue
        print(f"\n{kind} sets ({', '.join(members)}): mean, and the worst set's difference from {base}\n")
        print("| variant | accuracy | accuracy - base: mean / worst | s (x base) | AUROC near | AUROC far |\n"
              "|---|---|---|---|---|---|")
        for n in names:
            acc = {s: data[n][s]["accuracy"] for s in members}
            diff = {s: acc[s] - data[base][s]["accuracy"] for s in members}
            worst = min(diff, key=diff.get)
            ratio = sum(data[n][s]["s"] for s in members) / sum(data[base][s]["s"] for s in members)
            print(f"| {n} | {np.mean(list(acc.values())):.3f} | {np.mean(list(diff.values())):+.3f} / "
                  f"{diff[worst]:+.3f} ({worst}) | {ratio:.2f} | "
                  f"{np.mean([data[n][s]['near'] for s in members]):.3f} | "
                  f"{np.mean([data[n][s]['far'] for s in members]):.3f} |")


if __name__ == "__main__":
    main()
