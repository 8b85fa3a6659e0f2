"""Does a blend of the two table learners pay? On the table suite's splits (bench/table_suite.py), test scores of the
network alone, the trees alone, `--model auto` (the better on validation) and the blend (the mean of the two
models' probabilities, or of their predictions for regression), each learner trained as `itfits fit` trains it.

    OMP_NUM_THREADS=1 python bench/table_blend.py [--seeds 0,1,2,3,4] [--tables a,b]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import table_sets  # noqa: E402
from table_suite import scores, split_table  # noqa: E402
from pipelines.metrics import softmax  # noqa: E402
from pipelines.run import FitConfig  # noqa: E402
from pipelines.table_learners import LEARNERS, choose, valid_scores  # noqa: E402
from pipelines.tabular import prepare_table  # noqa: E402


def run_split(name: str, seed: int, tmp: Path) -> dict:
    _, target, task = table_sets.TABLES[name]
    train_csv, test_csv = split_table(table_sets.build(name), target, task, seed, tmp / name)
    data = prepare_table(train_csv, target=target, seed=seed)
    config = FitConfig(data=str(train_csv), target=target, seed=seed, out=str(tmp / "run"))
    _, parsed, errors = data.prep.read_rows(test_csv)
    x = data.prep.encode(parsed)
    truth = pl.read_csv(test_csv, infer_schema=False)[target].to_list()
    outs, valid, fits = {}, {}, {}
    for k, learner in LEARNERS.items():
        fits[k] = learner.train(data, config, tmp / "run", lambda *a: None)
        valid[k] = valid_scores(learner, fits[k], data)
        outs[k] = learner.outputs(fits[k].model, *x)[0]
    classify = task == "classification"

    def score(logits_or_probs, probs=False):
        if classify:
            p = logits_or_probs if probs else softmax(logits_or_probs)
            return scores(task, np.asarray(data.prep.classes)[p.argmax(1)], truth)
        return scores(task, data.prep.decode_target(logits_or_probs[:, 0]), truth)
    kept, _ = choose(valid)
    blend = ((softmax(outs["nn"]) + softmax(outs["gbdt"])) / 2 if classify else (outs["nn"] + outs["gbdt"]) / 2)
    key = "accuracy" if classify else "r2"
    return {"nn": score(outs["nn"])[key], "gbdt": score(outs["gbdt"])[key], "auto": score(outs[kept])[key],
            "blend": score(blend, probs=classify)[key]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tables", default=",".join(table_sets.TABLES))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tables.split(","):
            rows[name] = [run_split(name, int(s), Path(tmp)) for s in args.seeds.split(",")]
            print(name, {k: round(float(np.mean([r[k] for r in rows[name]])), 4) for k in rows[name][0]}, flush=True)
    print("\n| table | nn | gbdt | auto | blend |\n|---|---|---|---|---|")
    for name, rs in rows.items():
        print(f"| {name} | " + " | ".join(f"{np.mean([r[k] for r in rs]):.3f}" for k in ("nn", "gbdt", "auto", "blend"))
              + " |")


if __name__ == "__main__":
    main()
