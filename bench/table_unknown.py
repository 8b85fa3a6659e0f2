"""The unknown score of gradient-boosted trees on tables (pipelines/gbdt.py), chosen on the table suite: how well each
score tells rows unlike the training data from known test rows, and what share of correct known test rows the
threshold chosen on validation (keep 0.95) accepts.

Two kinds of rows unlike the training data, per table of bench/table_sets.py (classification) and seed:
  held-out class  tables of 3 or more classes: each class in turn is left out of training; its rows are the unknowns
  shifted rows    every table: the known test rows with two of their numbers moved by 4 training standard deviations
Known rows: the seeded 20% test split of bench/table_suite.py (the held-out class's rows taken out).

    OMP_NUM_THREADS=1 python bench/table_unknown.py [--seeds 0,1,2,3,4] [--tables a,b]

Prints per score the mean AUROC over tables and the worst table, for each kind, and the threshold's acceptance of
correct known test rows (target 0.92-0.98 at keep 0.95).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import table_sets  # noqa: E402
from table_suite import split_table  # noqa: E402
from pipelines.calibration import calibrate_table  # noqa: E402
from pipelines.metrics import auroc  # noqa: E402
from pipelines.run import FitConfig  # noqa: E402
from pipelines.sources import NULL_VALUES  # noqa: E402
from pipelines.table_learners import LEARNERS  # noqa: E402
from pipelines.tabular import prepare_table  # noqa: E402
from pipelines.unknown import compute_scores  # noqa: E402

SCORES = ("max_softmax", "energy", "knn", "mahalanobis", "combined")


def evaluate(train_csv: Path, known: pl.DataFrame, unknown: pl.DataFrame, target: str, seed: int, tmp: Path,
             learner: str = "gbdt") -> dict:
    """AUROC of each score (known test rows against `unknown` rows) and the default threshold's acceptance."""
    data = prepare_table(train_csv, target=target, seed=seed)
    entry = LEARNERS[learner]
    config = FitConfig(data=str(train_csv), target=target, seed=seed, out=str(tmp))
    fit = entry.train(data, config, tmp, lambda *a: None)
    out = {}
    for name in SCORES:
        calib, _, _, _ = calibrate_table(entry.outputs, fit.model, data, FitConfig(
            data=str(train_csv), target=target, seed=seed, out=str(tmp), score=name), default_score=name)
        scores = {}
        for part, rows in (("known", known), ("unknown", unknown)):
            path = tmp / f"{part}.csv"
            rows.write_csv(path)
            _, parsed, errors = data.prep.read_rows(path)
            parsed = parsed.filter(errors.is_null())
            logits, feats = entry.outputs(fit.model, *data.prep.encode(parsed))
            scores[part] = compute_scores(logits, feats, temperature=calib.temperature, stats=calib.stats,
                                          names=[name])[name]
            if part == "known":
                truth = rows.filter(errors.is_null())[target].cast(pl.String).to_numpy()
                correct = np.asarray(data.prep.classes)[logits.argmax(1)] == truth
        out[name] = {"auroc": auroc(scores["known"], scores["unknown"]),
                     "accepted": float((scores["known"][correct] >= calib.threshold).mean())}
    return out


def shifted(rows: pl.DataFrame, data_csv: Path, target: str, seed: int) -> pl.DataFrame:
    """`rows` with two numeric columns moved by 4 standard deviations of the training table's (up or down)."""
    train = pl.read_csv(data_csv, infer_schema_length=None, null_values=NULL_VALUES)
    numeric = [c for c, t in train.schema.items() if c != target and t.is_numeric() and train[c].n_unique() > 10]
    rng = np.random.default_rng(seed)
    cols = rng.choice(numeric, size=min(2, len(numeric)), replace=False)
    typed = pl.read_csv(io.BytesIO(rows.write_csv().encode()), infer_schema_length=None, null_values=NULL_VALUES)
    moved = []
    for c in cols:
        step = float(rng.choice([-4, 4])) * train[c].std()
        whole = typed.schema[c].is_integer()  # whole numbers stay whole: the model reads them so
        moved.append((pl.col(c) + (round(step) if whole else step)).alias(c))
    return typed.with_columns(moved)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tables", default=",".join(n for n, t in table_sets.TABLES.items() if t[2] == "classification"))
    ap.add_argument("--learner", default="gbdt")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    results = {"held-out class": {}, "shifted rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.tables.split(","):
            _, target, _ = table_sets.TABLES[name]
            path = table_sets.build(name)
            for seed in map(int, args.seeds.split(",")):
                train_csv, test_csv = split_table(path, target, "classification", seed, tmp / name)
                train, test = pl.read_csv(train_csv, infer_schema=False), pl.read_csv(test_csv, infer_schema=False)
                r = evaluate(train_csv, test, shifted(test, train_csv, target, seed), target, seed, tmp,
                             args.learner)
                results["shifted rows"].setdefault(name, []).append(r)
                classes = sorted(train[target].unique().to_list())
                for c in classes if len(classes) >= 3 else []:
                    kept = tmp / name / "kept.csv"
                    train.filter(pl.col(target) != c).write_csv(kept)
                    r = evaluate(kept, test.filter(pl.col(target) != c), pl.concat([train, test]).filter(
                        pl.col(target) == c), target, seed, tmp, args.learner)
                    results["held-out class"].setdefault(name, []).append(r)
                print(name, seed, "done", flush=True)
    for kind, tables in results.items():
        print(f"\n**{kind}** ({args.learner}; AUROC mean over tables / worst table; correct known test rows "
              "accepted)\n")
        print("| score | AUROC mean | AUROC worst | accepted mean | accepted min | accepted max |")
        print("|---|---|---|---|---|---|")
        for s in SCORES:
            per = {t: np.mean([r[s]["auroc"] for r in rs]) for t, rs in tables.items()}
            acc = {t: np.mean([r[s]["accepted"] for r in rs]) for t, rs in tables.items()}
            worst = min(per, key=per.get)
            print(f"| {s} | {np.mean(list(per.values())):.3f} | {per[worst]:.3f} ({worst}) | "
                  f"{np.mean(list(acc.values())):.3f} | {min(acc.values()):.3f} | {max(acc.values()):.3f} |")


if __name__ == "__main__":
    main()
