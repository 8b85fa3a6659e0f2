"""Does test-time augmentation (`--tta`) pay for its cost? Measured on the unknown-detection suite's image sets.

Each bundle that bench/unknown_suite.py trained (RUNS/SET-...-seedS/model) is evaluated on its set's known test
files, with its set's near held-out classes as --unknown, twice in one process: without and with --tta,
alternating, so that both see the same machine. Per variant: test accuracy, calibrated ECE, the share of correct
known files the bundle's threshold keeps, the AUROC of its shipped score against the near unknowns, and seconds.
Audio is left out: a spectrogram has no mirror image (`--tta` is for image models).

    python bench/unknown_suite.py --sizes 64 --seeds 0,1 --epochs 3 --out RUNS   # the bundles
    python bench/tta_suite.py --runs RUNS

Results: a markdown table on stdout (bench/BENCHMARKS.md keeps it with the command).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_sets  # noqa: E402
from pipelines.evaluate import evaluate  # noqa: E402

COLUMNS = ("accuracy", "ece", "kept", "auroc_near", "seconds")


def measure(model: Path, set_dir: Path, *, tta: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = evaluate(model, set_dir / "test", out=tmp, unknown=set_dir / "near", num_workers=0, tta=tta)
        seconds = time.perf_counter() - t0
    shipped = m["unknown_rule"]["score"]
    return {"accuracy": m["accuracy"], "ece": m["ece"]["calibrated"], "kept": m["unknown_rule"]["correct_accepted"],
            "auroc_near": m["scores"][shipped]["auroc"], "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="the --out folder of bench/unknown_suite.py")
    args = ap.parse_args()
    rows: dict[str, dict[bool, list[dict]]] = {}
    for run in sorted(Path(args.runs).glob("*-seed*")):
        name = run.name.split("-")[0]
        if name in suite_sets.AUDIO_SETS or not (run / "model").is_dir():
            continue
        set_dir = suite_sets.CACHE / "sets" / name
        for tta in (False, True):
            rows.setdefault(name, {False: [], True: []})[tta].append(measure(run / "model", set_dir, tta=tta))
        print(f"{run.name}: " + ", ".join(f"{'tta' if t else 'plain'} accuracy {rows[name][t][-1]['accuracy']:.3f}"
                                          for t in (False, True)), flush=True)
    print("\n| set | accuracy | accuracy, --tta | ECE | ECE, --tta | kept | kept, --tta | AUROC near | AUROC near, "
          "--tta | s | s, --tta |\n|---|" + "---|" * 10)
    means = {t: {c: [] for c in COLUMNS} for t in (False, True)}
    for name, by in rows.items():
        cells = []
        for c in COLUMNS:
            for t in (False, True):
                value = float(np.mean([r[c] for r in by[t]]))
                means[t][c].append(value)
                cells.append(f"{value:.{1 if c == 'seconds' else 3}f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **mean** | " + " | ".join(f"{np.mean(means[t][c]):.{1 if c == 'seconds' else 3}f}"
                                      for c in COLUMNS for t in (False, True)) + " |")
    gain = np.array(means[True]["accuracy"]) - np.array(means[False]["accuracy"])
    print(f"\n--tta accuracy gain: mean {gain.mean():+.3f}, worst set {gain.min():+.3f}; time x"
          f"{np.sum(means[True]['seconds']) / np.sum(means[False]['seconds']):.2f}")


if __name__ == "__main__":
    main()
