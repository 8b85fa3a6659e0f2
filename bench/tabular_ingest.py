"""Tabular ingest and accuracy, measured side by side in one run.

1. Read + preprocess a generated 1,000,000-row mixed-type CSV (ints, floats with missing values, strings of a few
   dozen categories, booleans) to model-ready data, each method in its own child process: wall time of the work
   (imports and a warm-up run on 2,000 rows excluded) and peak RSS as the kernel counts it (VmHWM of the child's
   own address space: it sees polars/numpy C allocations, which tracemalloc misses), in all and above the peak
   after imports and warm-up.
     itfits:  pipelines.tabular.prepare_table (polars: lazy scan, column inference, split, fill/flag, normalise,
              category codes -> numpy arrays)
     fastai:  pandas.read_csv + cont_cat_split + TabularPandas(procs=[Categorify, FillMissing, Normalize])
   The same table as Parquet (pandas.read_parquet for fastai) shows the preprocessing with less of the parsing.
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

def ingest_itfits(table: Path) -> dict:
    from pipelines.tabular import prepare_table
    t0 = time.perf_counter()
    data = prepare_table(table, target=TARGET, seed=42)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cat": data.prep.cat + [f"{c}_na" for c in data.prep.na], "cont": data.prep.cont,
            "rows": len(data.y)}


def ingest_fastai(table: Path) -> dict:
    import pandas as pd
    from fastai.data.block import CategoryBlock
    from fastai.data.transforms import RandomSplitter
    from fastai.tabular.core import Categorify, FillMissing, Normalize, TabularPandas
    from fastai.tabular.core import cont_cat_split
    from fastcore.basics import range_of
    t0 = time.perf_counter()
    df = pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)
    cont, cat = cont_cat_split(df, max_card=20, dep_var=TARGET)
    splits = RandomSplitter(valid_pct=0.2, seed=42)(range_of(df))
    to = TabularPandas(df, procs=[Categorify, FillMissing, Normalize], cat_names=cat, cont_names=cont,
                       y_names=TARGET, y_block=CategoryBlock(), splits=splits)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cat": list(to.cat_names), "cont": list(to.cont_names), "rows": len(to)}


def child(method: str, table: Path) -> None:
    import importlib
    modules = {"itfits": ["pipelines.tabular"],  # imports are not timed; their memory is the baseline
               "fastai": ["pandas", "pyarrow.parquet", "fastai.tabular.core", "fastai.data.block", "fastcore.basics"]}
    for name in modules[method]:
        importlib.import_module(name)
    ingest = {"itfits": ingest_itfits, "fastai": ingest_fastai}[method]
    ingest(table.with_name(f"small{table.suffix}"))  # warm-up: lazy imports, thread pools, allocator arenas
    baseline = peak_rss_mb()  # imports + warm-up
    res = ingest(table)
    res.update(baseline_mb=baseline, peak_mb=peak_rss_mb())
    print("RESULT " + json.dumps(res))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux VmHWM). Unlike ru_maxrss it starts afresh at exec, so a child
    does not inherit the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("this benchmark reads peak memory from /proc/self/status (Linux)")


def run_child(method: str, table: Path) -> dict:
    """Run one method in a fresh interpreter and read back its timing and memory."""
    proc = subprocess.run([sys.executable, __file__, "--child", method, "--table", str(table)], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
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
    from pipelines.run import FitConfig, fit
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
    ap.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.table)

    threads = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")}
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          + ", ".join(f"{k}={v}" for k, v in threads.items()))
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "mixed.csv"
        t0 = time.perf_counter()
        make_table(csv, args.rows)
        import polars as pl
        table = pl.read_csv(csv)
        table.write_parquet(csv.with_suffix(".parquet"))
        table.head(2000).write_csv(csv.with_name("small.csv"))  # for a warm-up run in each child
        table.head(2000).write_parquet(csv.with_name("small.parquet"))
        del table
        print(f"wrote {args.rows:,} rows, {csv.stat().st_size / 2**20:.0f} MiB CSV "
              f"({csv.with_suffix('.parquet').stat().st_size / 2**20:.0f} MiB Parquet) in {time.perf_counter() - t0:.1f}s")
        runs = {(m, fmt): [] for fmt in ("csv", "parquet") for m in ("itfits", "fastai")}
        for r in range(args.repeats):
            for (method, fmt), results in runs.items():
                results.append(run_child(method, csv.with_suffix(f".{fmt}")))
                res = results[-1]
                print(f"  run {r + 1} {method:7s} {fmt:8s}{res['seconds']:6.2f}s  peak RSS {res['peak_mb']:6.0f} MiB "
                      f"(+{res['work_mb']:.0f} over imports)  {res['rows']:,} rows, {len(res['cat'])} cat + "
                      f"{len(res['cont'])} cont inputs", flush=True)
    med = {k: {q: statistics.median(r[q] for r in rs) for q in ("seconds", "peak_mb", "work_mb")} for k, rs in runs.items()}
    print(f"\nread + preprocess {args.rows:,} rows (median of {args.repeats} runs, each in a fresh process):")
    print("| input | method | seconds | peak RSS MiB | RSS over imports MiB |\n|---|---|---|---|---|")
    for (method, fmt), m in med.items():
        label = "itfits (polars)" if method == "itfits" else "pandas + fastai TabularPandas"
        print(f"| {fmt.upper() if fmt == 'csv' else 'Parquet'} | {label} | {m['seconds']:.2f} | {m['peak_mb']:.0f} | "
              f"{m['work_mb']:.0f} |")
    for fmt in ("csv", "parquet"):
        it, fa = med[("itfits", fmt)], med[("fastai", fmt)]
        print(f"{fmt}: itfits is {fa['seconds'] / it['seconds']:.1f}x as fast, needs "
              f"{fa['work_mb'] / max(it['work_mb'], 1):.1f}x less memory over imports "
              f"({fa['peak_mb'] / it['peak_mb']:.2f}x less peak RSS)")

    print("\naccuracy on data/penguins.csv (same split for both; itfits: fit defaults, lr_find, 5 epochs):")
    rows = accuracy_table(list(range(42, 42 + args.seeds)))
    print("| target | itfits | HistGradientBoosting |\n|---|---|---|")
    for target in ("species", "sex"):
        sel = [r for r in rows if r["target"] == target]
        print(f"| {target} | {statistics.mean(r['itfits'] for r in sel):.3f} | "
              f"{statistics.mean(r['hgb'] for r in sel):.3f} |")


if __name__ == "__main__":
    main()
