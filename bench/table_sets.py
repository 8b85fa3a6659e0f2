"""The tables of bench/table_suite.py, built from packages that install offline (licences: bench/SUITE_DATA.md).

Seven real tables, as their packages ship them (only what is said below is changed):

| table | rows | target | what it exercises |
|---|---|---|---|
| penguins_raw | 344 | Species (3) | a date column (Date Egg), text categories, a near-id (Individual ID), missing values |
| breast_cancer | 699 | Class (2) | integer-coded categories, a text id (Id, 645 values), missing values |
| pima | 768 | diabetes (2) | numbers only, a hard target |
| vehicle | 846 | Class (4) | numbers only, 18 shape features |
| glass | 214 | Type (6) | small, unbalanced classes (the smallest has 9 rows) |
| ozone | 361 | V4 (regression) | a date column (1976's days), many missing values |
| diabetes | 442 | progression (regression) | numbers only |

    python bench/table_sets.py            # builds what is missing; prints where

Debian packages are fetched with `apt-get download` and unpacked under ~/.cache/itfits-bench (ITFITS_BENCH_CACHE),
as bench/suite_sets.py does; R's .rda files are read with the `rdata` package (pure Python, no R). A table is
rebuilt only when its recipe (VERSION) changes.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_sets import CACHE, unpack  # noqa: E402

VERSION = 1
R_LIB = "usr/lib/R/site-library"


def _rda(name: str) -> pl.DataFrame:
    """A data frame of mlbench's data/NAME.rda, factors as their labels (text)."""
    import rdata
    with warnings.catch_warnings():  # "Unknown encoding. Assumed ASCII.": mlbench's files are ASCII
        warnings.simplefilter("ignore", UserWarning)
        frame = next(iter(rdata.read_rda(unpack("mlbench") / R_LIB / f"mlbench/data/{name}.rda").values()))
    return pl.from_pandas(frame.astype({c: str for c in frame.columns if str(frame[c].dtype) == "category"})
                          .replace({"nan": None}), include_index=False)


def penguins_raw() -> pl.DataFrame:
    return pl.read_csv(unpack("penguins_raw") / R_LIB / "palmerpenguins/extdata/penguins_raw.csv",
                       infer_schema=False)  # as text: written back unchanged, each tool parses it itself


def breast_cancer() -> pl.DataFrame:
    return _rda("BreastCancer")


def pima() -> pl.DataFrame:
    return _rda("PimaIndiansDiabetes")


def vehicle() -> pl.DataFrame:
    return _rda("Vehicle")


def glass() -> pl.DataFrame:
    return _rda("Glass")


def ozone() -> pl.DataFrame:
    """mlbench's Ozone: daily maximum ozone (V4) of 1976 in Los Angeles; its month (V1), day of month (V2) and
    weekday (V3) columns are written as one ISO date, as a table of days has it; rows without V4 left out."""
    df = _rda("Ozone")
    date = pl.date(1976, pl.col("V1").cast(pl.Int32), pl.col("V2").cast(pl.Int32)).dt.to_string("%Y-%m-%d")
    return df.filter(pl.col("V4").is_not_null()).select(date.alias("date"), pl.exclude("V1", "V2", "V3"))


def diabetes() -> pl.DataFrame:
    from sklearn.datasets import load_diabetes  # scikit-learn's bundled copy, unscaled
    d = load_diabetes(as_frame=True, scaled=False)
    return pl.from_pandas(d.frame.rename(columns={"target": "progression"}))


# name -> (builder, target, task)
TABLES = {
    "penguins_raw": (penguins_raw, "Species", "classification"),
    "breast_cancer": (breast_cancer, "Class", "classification"),
    "pima": (pima, "diabetes", "classification"),
    "vehicle": (vehicle, "Class", "classification"),
    "glass": (glass, "Type", "classification"),
    "ozone": (ozone, "V4", "regression"),
    "diabetes": (diabetes, "progression", "regression"),
}


def build(name: str) -> Path:
    """CACHE/tables/NAME.csv, built unless up to date."""
    out = CACHE / "tables" / f"{name}.csv"
    stamp = out.with_suffix(".json")
    recipe = {"version": VERSION, "table": name}
    if out.exists() and stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    TABLES[name][0]().write_csv(tmp)
    tmp.replace(out)
    stamp.write_text(json.dumps(recipe))
    return out


def main():
    for name in TABLES:
        path = build(name)
        df = pl.read_csv(path, infer_schema_length=None)
        print(f"{name}: {path} {df.height} rows, {df.width} columns, target {TABLES[name][1]}")


if __name__ == "__main__":
    main()
