"""Test accuracy (RMSE and R² for regression) and time to train of itfits' defaults on tables, against fastai's plain
recipe and scikit-learn's HistGradientBoosting, side by side on the same splits.

For each table of bench/table_sets.py and each seed: a seeded 20% of the rows (stratified by class for
classification) is the test split, written aside; the rest is the table given to `itfits fit TABLE --target T
--seed SEED` (the CLI, in this process), which holds out its own validation rows. The other two train on the same
training rows and see the same validation rows:

  itfits   `itfits fit TRAIN --target T --seed S`, then `itfits predict RUN/model TEST --out P.csv` (top1 / prediction)
  fastai   pandas.read_csv; cont_cat_split(max_card=20); TabularPandas(procs=[Categorify, FillMissing, Normalize],
           the same validation rows); tabular_learner (bs 64); lr_find valley; fit_one_cycle(10); test_dl
  hgb      HistGradientBoostingClassifier/Regressor() with its defaults on the training rows; text columns as
           pandas categories (native categorical splits; a column of more than 255 values as its codes)

Time to train: itfits the fit's own `seconds` (run.json: reading, lr_find, training, calibration; no report);
fastai from TabularPandas to the end of fit_one_cycle (lr_find included); hgb its fit.

    OMP_NUM_THREADS=1 python bench/table_suite.py [--tables a,b] [--seeds 0,1] [--out RUNS]

Results: RUNS/summary.json and markdown tables on stdout (bench/BENCHMARKS.md keeps them with the command).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import table_sets  # noqa: E402
from pipelines.sources import stratified_valid  # noqa: E402
from pipelines.tabular import prepare_table  # noqa: E402

METHODS = ("itfits", "fastai", "hgb")
TEST_PCT = 0.2


def split_table(path: Path, target: str, task: str, seed: int, out: Path) -> tuple[Path, Path]:
    """(train table, test table) of `path`: a seeded TEST_PCT of the rows, per class for classification."""
    df = pl.read_csv(path, infer_schema=False)  # as text: both parts are the file's own lines
    rng_seed = 1000 + seed  # not itfits' own validation seed
    if task == "classification":
        codes = df[target].rank("dense").cast(pl.Int64).to_numpy() - 1
        test = stratified_valid(codes, valid_pct=TEST_PCT, seed=rng_seed)
    else:
        test = np.zeros(df.height, bool)
        test[np.random.default_rng(rng_seed).permutation(df.height)[:round(df.height * TEST_PCT)]] = True
    out.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = out / "train.csv", out / "test.csv"
    df.filter(pl.Series(~test)).write_csv(train_csv)
    df.filter(pl.Series(test)).write_csv(test_csv)
    return train_csv, test_csv


def scores(task: str, pred, truth) -> dict:
    if task == "classification":
        return {"accuracy": float(np.mean(np.asarray(pred, dtype=str) == np.asarray(truth, dtype=str)))}
    pred, truth = np.asarray(pred, dtype=float), np.asarray(truth, dtype=float)
    err = pred - truth
    return {"rmse": float(np.sqrt(np.mean(err ** 2))),
            "r2": float(1 - (err ** 2).sum() / ((truth - truth.mean()) ** 2).sum())}


def run_itfits(train_csv: Path, test_csv: Path, target: str, task: str, seed: int, run: Path, fit_args=()) -> dict:
    from typer.testing import CliRunner
    from app.cli import app
    shutil.rmtree(run, ignore_errors=True)
    cli = CliRunner()
    res = cli.invoke(app, ["fit", str(train_csv), "--target", target, "--out", str(run), "--seed", str(seed),
                             *fit_args])
    if res.exit_code:
        raise RuntimeError(f"itfits fit failed: {res.output[-2000:]}") from res.exception
    (run / "fit.log").write_text(res.output)
    preds = run / "test_predictions.csv"
    res = cli.invoke(app, ["predict", str(run / "model"), str(test_csv), "--out", str(preds)])
    if res.exit_code:
        raise RuntimeError(f"itfits predict failed: {res.output[-2000:]}") from res.exception
    p = pl.read_csv(preds, infer_schema=False)
    truth = pl.read_csv(test_csv, infer_schema=False)[target]
    summary = json.loads((run / "run.json").read_text())
    got = p["top1"] if task == "classification" else p["prediction"]
    resolved = summary["resolved"]
    return {**scores(task, got.to_list(), truth.to_list()), "seconds": summary["results"]["seconds"],
            "model": resolved.get("learner", "nn"), "models": summary["results"].get("models"),
            **{k: resolved.get(k) for k in ("epochs", "kept_epoch", "lr", "bs", "rounds")}}


def validation_rows(train_csv: Path, target: str, seed: int) -> np.ndarray:
    """Row numbers (0-based, in the file) of the rows `itfits fit --seed SEED` validates on."""
    data = prepare_table(train_csv, target=target, seed=seed)
    return data.rows[data.valid]


def run_fastai(train_csv: Path, test_csv: Path, target: str, task: str, seed: int, valid_rows: np.ndarray) -> dict:
    """fastai's plain tabular recipe, as its tutorial has it."""
    import pandas as pd
    from fastai.data.block import CategoryBlock, RegressionBlock
    from fastai.metrics import accuracy, rmse
    from fastai.tabular.core import Categorify, FillMissing, TabularPandas, cont_cat_split
    from fastai.data.transforms import Normalize  # its tabular setups are patched on by fastai.tabular.core
    from fastai.tabular.learner import tabular_learner
    from fastai.torch_core import set_seed
    import fastai.callback.schedule  # noqa: F401  fit_one_cycle and lr_find are patched onto Learner here

    df, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    classify = task == "classification"
    if classify:
        df[target], test[target] = df[target].astype(str), test[target].astype(str)
    t0 = time.perf_counter()
    set_seed(seed)
    cont, cat = cont_cat_split(df, max_card=20, dep_var=target)
    valid = set(valid_rows.tolist())
    splits = ([i for i in range(len(df)) if i not in valid], sorted(valid))
    to = TabularPandas(df, procs=[Categorify, FillMissing, Normalize], cat_names=cat, cont_names=cont,
                       y_names=target, y_block=CategoryBlock() if classify else RegressionBlock(), splits=splits)
    learn = tabular_learner(to.dataloaders(bs=64), metrics=accuracy if classify else rmse)
    with learn.no_bar(), learn.no_logging():
        lr = learn.lr_find(show_plot=False).valley
        learn.fit_one_cycle(10, lr)
    seconds = time.perf_counter() - t0
    with learn.no_bar():
        preds, _ = learn.get_preds(dl=learn.dls.test_dl(test))
    got = (np.asarray(learn.dls.vocab)[preds.argmax(1).numpy()] if classify else preds[:, 0].numpy())
    return {**scores(task, got, test[target].to_numpy()), "seconds": round(seconds, 2), "lr": float(lr)}


def run_hgb(train_csv: Path, test_csv: Path, target: str, task: str, seed: int, valid_rows: np.ndarray) -> dict:
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    df, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    df = df.drop(index=valid_rows)  # the training rows of the others
    x, xt = df.drop(columns=[target]), test.drop(columns=[target])
    for c in x.columns:
        if not pd.api.types.is_numeric_dtype(x[c]):
            cats = pd.CategoricalDtype(sorted(x[c].dropna().unique()))
            x[c], xt[c] = x[c].astype(cats), xt[c].where(xt[c].isin(cats.categories)).astype(cats)  # unseen: missing
            if len(cats.categories) > 255:  # more than HGB's bins take as categories
                x[c], xt[c] = x[c].cat.codes.replace(-1, np.nan), xt[c].cat.codes.replace(-1, np.nan)
    model = (HistGradientBoostingClassifier if task == "classification" else HistGradientBoostingRegressor)(
        random_state=seed)
    t0 = time.perf_counter()
    model.fit(x, df[target].astype(str) if task == "classification" else df[target])
    seconds = time.perf_counter() - t0
    return {**scores(task, model.predict(xt), test[target].astype(str) if task == "classification"
                     else test[target]), "seconds": round(seconds, 2)}


BASELINE_VERSION = 1  # of run_fastai / run_hgb: their results are kept per table version, seed and this


def run_table(name: str, seeds: list[int], out: Path, methods=METHODS, fit_args=(), log=print) -> dict:
    """Every method on every seed's split of table `name`. A method's result on a split is kept as JSON (itfits':
    in OUT, so a new candidate takes a new --out; the baselines': in the bench cache, shared by every OUT), so a
    rerun redoes no work."""
    _, target, task = table_sets.TABLES[name]
    path = table_sets.build(name)
    per_seed = []
    for seed in seeds:
        d = out / name / f"seed{seed}"
        train_csv, test_csv = split_table(path, target, task, seed, d)
        valid_rows = validation_rows(train_csv, target, seed)
        row = {"seed": seed, "n_test": pl.read_csv(test_csv, infer_schema=False).height, "n_valid": len(valid_rows)}
        for m in methods:
            cache = (d / "itfits.json" if m == "itfits" else table_sets.CACHE / "table_suite" /
                     f"{name}-v{table_sets.VERSION}-seed{seed}-{m}-v{BASELINE_VERSION}.json")
            if cache.exists():
                row[m] = json.loads(cache.read_text())
            else:
                try:
                    row[m] = (run_itfits(train_csv, test_csv, target, task, seed, d / "itfits", fit_args)
                              if m == "itfits" else (run_fastai if m == "fastai" else run_hgb)(
                                  train_csv, test_csv, target, task, seed, valid_rows))
                except Exception as e:  # a recipe that fails on a table is a result too, reported as such
                    if m == "itfits":
                        raise
                    row[m] = {"error": f"{type(e).__name__}: {e}"}
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(row[m]))
            log(f"{name} seed {seed} {m}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row[m].items()))
        per_seed.append(row)
    return {"task": task, "target": target, "seeds": per_seed}


def seed_mean(result: dict, method: str, key: str) -> float:
    """Mean over the seeds where `method` ran (nan where it failed on every seed)."""
    values = [s[method][key] for s in result["seeds"] if "error" not in s[method]]
    return float(np.mean(values)) if values else float("nan")


def failures(result: dict, method: str) -> int:
    return sum("error" in s[method] for s in result["seeds"])


def markdown(results: dict, methods=METHODS) -> str:
    """Per table the mean over seeds; then the mean over tables and the worst table, per task. "itfits - best":
    itfits' score minus the best other method's (a gain in the better direction is positive); for classification
    also in test rows."""
    lines = []
    for task, metrics in (("classification", ["accuracy"]), ("regression", ["rmse", "r2"])):
        names = [n for n, r in results.items() if r["task"] == task]
        if not names:
            continue
        key = metrics[-1]  # accuracy or R² (higher is better) decides the comparison
        vals = {n: {(m, k): seed_mean(results[n], m, k) for m in methods for k in metrics + ["seconds"]} for n in names}
        gaps = {}
        head = [f"{m} {k}" for m in methods for k in metrics] + [f"{m} s" for m in methods]
        lines += [f"**{task}** (test {' and '.join(metrics)}, mean over seeds; seconds to train)", "",
                  "| table | test rows | " + " | ".join(head) + (" | itfits - best |" if "itfits" in methods else " |"),
                  "|---|---|" + "---|" * len(head) + ("---|" if "itfits" in methods else "")]
        for n in names:
            v, n_test = vals[n], float(np.mean([s["n_test"] for s in results[n]["seeds"]]))
            cell = lambda m, k: (f"{v[(m, k)]:.3f}" if np.isfinite(v[(m, k)]) else "failed") + (  # noqa: E731
                f" ({failures(results[n], m)} of {len(results[n]['seeds'])} seeds failed)"
                if 0 < failures(results[n], m) < len(results[n]["seeds"]) and k == key else "")
            row = f"| {n} | {n_test:.0f} | " + " | ".join(cell(m, k) for m in methods for k in metrics) + " | " \
                + " | ".join(f"{v[(m, 'seconds')]:.1f}" for m in methods) + " |"
            others = [v[(m, key)] for m in methods if m != "itfits" and np.isfinite(v[(m, key)])]
            if "itfits" in methods and others:
                gaps[n] = v[("itfits", key)] - max(others)
                row += f" {gaps[n]:+.3f}" + (f" ({gaps[n] * n_test:+.1f} rows)" if task == "classification" else "") + " |"
            lines.append(row)
        mean = {mk: np.nanmean([vals[n][mk] for n in names]) for mk in vals[names[0]]}
        unitless = lambda m, k: "" if k == "rmse" else f"{mean[(m, k)]:.3f}"  # noqa: E731  RMSEs of other units
        lines.append("| **mean** | | " + " | ".join(unitless(m, k) for m in methods for k in metrics) + " | "
                     + " | ".join(f"{mean[(m, 'seconds')]:.1f}" for m in methods) + " |"
                     + (f" {np.mean(list(gaps.values())):+.3f} |" if gaps else ""))
        worst = []
        for m in methods:
            for k in metrics:
                t = {n: vals[n][(m, k)] for n in names if np.isfinite(vals[n][(m, k)])}
                w = min(t, key=t.get) if k != "rmse" else None
                worst.append(f"{t[w]:.3f} ({w})" if w else "")
        lines.append("| **worst** | | " + " | ".join(worst) + " |" + " |" * len(methods)
                     + (f" {min(gaps.values()):+.3f} ({min(gaps, key=gaps.get)}) |" if gaps else ""))
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", default=",".join(table_sets.TABLES))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=Path("runs/table_suite"))
    ap.add_argument("--fit-args", default="", help="extra flags for itfits fit (a candidate default), e.g. '--epochs 10'")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)  # small tables: one thread is as fast, and the suite runs beside other work
    seeds, methods = [int(s) for s in args.seeds.split(",")], args.methods.split(",")
    t0 = time.perf_counter()
    results = {n: run_table(n, seeds, args.out, methods, args.fit_args.split()) for n in args.tables.split(",")}
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"\n{time.perf_counter() - t0:.0f} s in all\n")
    print(markdown(results, methods))


if __name__ == "__main__":
    main()
