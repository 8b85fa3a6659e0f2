"""Tabular ingest and accuracy, measured side by side in one run.

1. Read + preprocess a generated 1,000,000-row mixed-type CSV (ints, floats with missing values, strings of a few
   dozen categories, booleans) to model-ready data, each method in its own child process: wall time of the work
   (imports excluded) and peak RSS from the kernel (os.wait4 rusage: sees polars/numpy C allocations too).
     itfits:  pipelines.tabular.prepare_table (polars: lazy scan, column inference, split, fill/flag, normalise,
              category codes -> numpy arrays)
     fastai:  pandas.read_csv + cont_cat_split + TabularPandas(procs=[Categorify, FillMissing, Normalize])
2. Validation accuracy of itfits (fit with its defaults) vs scikit-learn's HistGradientBoostingClassifier on the
   same split of data/penguins.csv, over a few seeds.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 POLARS_MAX_THREADS=2 python bench/tabular_ingest.py [--rows N] [--repeats R]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET = "target"


def make_table(path: Path, rows: int, seed: int = 0) -> None:
    """A mixed-type table: 2 ints (one low-cardinality), 3 floats (two with missing values), 3 string columns
    (40, 25 and 8 categories, one with missing values), 2 booleans and a 3-class string target."""
    import numpy as np
    import polars as pl
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 91, rows)
    income = rng.lognormal(10, 0.5, rows)
    score = rng.normal(0, 1, rows)
    city = rng.integers(0, 40, rows)
    member = rng.random(rows) < 0.3
    logit = 0.03 * (age - 50) + score + (city % 5 - 2) * 0.4 + member * 0.8 + rng.normal(0, 1, rows)
    target = np.where(logit < -0.7, "low", np.where(logit < 0.7, "mid", "high"))
    with_missing = lambda x, p: pl.Series(x).scatter(np.flatnonzero(rng.random(rows) < p), None)  # noqa: E731
    pl.DataFrame({
        "age": age,
        "n_items": rng.integers(0, 10, rows),
        "income": with_missing(income.round(2), 0.10),
        "score": with_missing(score.round(4), 0.05),
        "ratio": rng.random(rows).round(4),
        "city": with_missing(np.char.add("city_", city.astype(str)), 0.03),
        "product": np.char.add("p", rng.integers(0, 25, rows).astype(str)),
        "segment": rng.choice(["a", "b", "c", "d", "e", "f", "g", "h"], rows),
        "member": member,
        "newsletter": rng.random(rows) < 0.5,
        TARGET: target,
    }).write_csv(path)


# ---- the two ingest methods, each run in a child process --------------------------------------------------------

def ingest_itfits(csv: Path) -> dict:
    from pipelines.tabular import prepare_table
    t0 = time.perf_counter()
    data = prepare_table(csv, target=TARGET, seed=42)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cat": data.prep.cat + [f"{c}_na" for c in data.prep.na], "cont": data.prep.cont,
            "rows": len(data.y)}


def ingest_fastai(csv: Path) -> dict:
    import pandas as pd
    from fastai.data.block import CategoryBlock
    from fastai.data.transforms import RandomSplitter
    from fastai.tabular.core import Categorify, FillMissing, Normalize, TabularPandas
    from fastai.tabular.core import cont_cat_split
    from fastcore.basics import range_of
    t0 = time.perf_counter()
    df = pd.read_csv(csv)
    cont, cat = cont_cat_split(df, max_card=20, dep_var=TARGET)
    splits = RandomSplitter(valid_pct=0.2, seed=42)(range_of(df))
    to = TabularPandas(df, procs=[Categorify, FillMissing, Normalize], cat_names=cat, cont_names=cont,
                       y_names=TARGET, y_block=CategoryBlock(), splits=splits)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cat": list(to.cat_names), "cont": list(to.cont_names), "rows": len(to)}


def child(method: str, csv: Path) -> None:
    import numpy  # noqa: F401  (imports are not timed; their memory is the baseline)
    import polars  # noqa: F401
    import torch  # noqa: F401
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"itfits": ingest_itfits, "fastai": ingest_fastai}[method](csv)
    res["baseline_mb"] = baseline / 1024
    print("RESULT " + json.dumps(res))


def run_child(method: str, csv: Path) -> dict:
    """Run one method in a fresh interpreter; its own peak RSS comes from os.wait4 (Linux ru_maxrss is in KiB)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", method, "--csv", str(csv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{err[-3000:]}")
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    res["peak_mb"] = usage.ru_maxrss / 1024
    res["work_mb"] = res["peak_mb"] - res["baseline_mb"]
    return res


# ---- accuracy on the sample data ------------------------------------------------------------------------------------

def hgb_accuracy(csv: Path, data, seed: int) -> float:
    """HistGradientBoostingClassifier on the same rows, columns and split as itfits (native NaN handling,
    categorical columns ordinal-encoded and declared categorical)."""
    import numpy as np
    import polars as pl
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.preprocessing import OrdinalEncoder
    from pipelines.sources import read_table
    prep = data.prep
    df = read_table(csv)[data.rows.tolist()]  # the rows itfits used, values read as itfits reads them
    cats = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan, encoded_missing_value=np.nan)
    x_cat = df.select(pl.col(prep.cat).cast(pl.String)).to_numpy().astype(object)
    x_cat = np.where(x_cat == None, np.nan, x_cat)  # noqa: E711
    train, valid = ~data.valid, data.valid
    cats.fit(x_cat[train])
    x = np.hstack([cats.transform(x_cat), df.select(pl.col(prep.cont).cast(pl.Float64)).to_numpy()])
    y = df[prep.target].cast(pl.String).to_numpy()
    model = HistGradientBoostingClassifier(categorical_features=list(range(len(prep.cat))), random_state=seed)
    model.fit(x[train], y[train])
    return float((model.predict(x[valid]) == y[valid]).mean())


def accuracy_table(seeds: list[int]) -> list[dict]:
    from pipelines.tabular import prepare_table
    from pipelines.training import FitConfig, fit
    csv = REPO / "data" / "penguins.csv"
    rows = []
    for target in ("species", "sex"):
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet, \
                    contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # fastai's progress output
                summary = fit(FitConfig(data=str(csv), target=target, out=tmp, seed=seed), log=lambda *_: None)
            data = prepare_table(csv, target=target, seed=seed)
            rows.append({"target": target, "seed": seed, "n_valid": int(data.valid.sum()),
                         "itfits": summary["results"]["valid_accuracy"], "hgb": hgb_accuracy(csv, data, seed)})
            print(f"  {target:8s} seed {seed}: itfits {rows[-1]['itfits']:.3f}  HGB {rows[-1]['hgb']:.3f} "
                  f"({rows[-1]['n_valid']} valid rows)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each method, alternating; the median is reported")
    ap.add_argument("--seeds", type=int, default=3, help="splits of the sample data for the accuracy comparison")
    ap.add_argument("--child", choices=["itfits", "fastai"], help=argparse.SUPPRESS)
    ap.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.csv)

    threads = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")}
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          + ", ".join(f"{k}={v}" for k, v in threads.items()))
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "mixed.csv"
        t0 = time.perf_counter()
        make_table(csv, args.rows)
        print(f"wrote {args.rows:,} rows, {csv.stat().st_size / 2**20:.0f} MiB CSV in {time.perf_counter() - t0:.1f}s")
        runs = {"itfits": [], "fastai": []}
        for r in range(args.repeats):
            for method in runs:
                runs[method].append(run_child(method, csv))
                res = runs[method][-1]
                print(f"  run {r + 1} {method:7s} {res['seconds']:6.2f}s  peak RSS {res['peak_mb']:7.0f} MiB "
                      f"(+{res['work_mb']:.0f} over imports)  {res['rows']:,} rows, {len(res['cat'])} cat + "
                      f"{len(res['cont'])} cont inputs", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_mb", "work_mb")} for m, rs in runs.items()}
    print(f"\ningest of {args.rows:,} rows (median of {args.repeats}):")
    print("| method | seconds | peak RSS MiB | RSS over imports MiB |\n|---|---|---|---|")
    for m, label in (("itfits", "itfits (polars)"), ("fastai", "pandas + fastai TabularPandas")):
        print(f"| {label} | {med[m]['seconds']:.2f} | {med[m]['peak_mb']:.0f} | {med[m]['work_mb']:.0f} |")
    print(f"itfits is {med['fastai']['seconds'] / med['itfits']['seconds']:.1f}x faster, uses "
          f"{med['fastai']['work_mb'] / max(med['itfits']['work_mb'], 1):.1f}x less memory over imports "
          f"({med['fastai']['peak_mb'] / med['itfits']['peak_mb']:.1f}x less peak RSS)")

    print("\naccuracy on data/penguins.csv (same split for both; itfits: fit defaults, lr_find, 5 epochs):")
    rows = accuracy_table(list(range(42, 42 + args.seeds)))
    print("| target | itfits | HistGradientBoosting |\n|---|---|---|")
    for target in ("species", "sex"):
        sel = [r for r in rows if r["target"] == target]
        print(f"| {target} | {statistics.mean(r['itfits'] for r in sel):.3f} | "
              f"{statistics.mean(r['hgb'] for r in sel):.3f} |")


if __name__ == "__main__":
    main()
