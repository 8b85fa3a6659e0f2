"""Time to fit a 1,000-row table with every default (issue 31 item 3: <= 5 s on 2 quiet cores, lr_find included),
`itfits fit` in a fresh interpreter as a user runs it, and where the time goes (cProfile, `--profile`).

The table (`weather1000`, built into the bench cache): 1,000 days from 2015-01-01 of a synthetic daily weather
record, a date column and 4 numbers (temperature max/min, precipitation, wind) -> 5 weather classes drawn from
them with noise; the shape of the 1,096-row weather table of issue 32 (its data is not shipped here).

    python bench/table_speed.py [--runs 3] [--fit-args "--model nn"] [--profile PROFILE.txt]

Prints each run's wall time (process start to exit) and run.json's `seconds`; with --profile the top of a cProfile of
one run, by cumulative time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_sets import CACHE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def weather_table(n: int = 1000, seed: int = 0) -> Path:
    out = CACHE / "tables" / f"weather{n}.csv"
    if out.exists():
        return out
    rng = np.random.default_rng(seed)
    day = np.arange(n)
    season = np.sin(2 * np.pi * (day - 100) / 365.25)
    t_max = 16 + 10 * season + rng.normal(0, 3, n)
    t_min = t_max - rng.uniform(4, 11, n)
    wet = rng.random(n) < 0.35 - 0.15 * season
    precip = np.where(wet, rng.gamma(1.2, 6, n), 0.0).round(1)
    wind = rng.gamma(3, 1.2, n).round(1)
    weather = np.where(precip > 4, np.where(t_max < 2, "snow", "rain"),
                       np.where(precip > 0, "drizzle", np.where((wind < 2) & (t_min < 5), "fog", "sun")))
    flip = rng.random(n) < 0.15  # labels as a person records them: some disagree with the numbers
    weather = np.where(flip, rng.choice(["sun", "rain", "drizzle", "fog", "snow"], n), weather)
    dates = pl.date_range(pl.date(2015, 1, 1), pl.date(2015, 1, 1) + pl.duration(days=n - 1), eager=True)
    df = pl.DataFrame({"date": dates.dt.to_string("%Y-%m-%d"), "precipitation": precip, "temp_max": t_max.round(1),
                       "temp_min": t_min.round(1), "wind": wind, "weather": weather})
    out.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(out)
    return out


def fit_once(table: Path, run: Path, fit_args: list[str], profile: Path | None = None) -> dict:
    cmd = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + [
        "-m", "app.cli", "fit", str(table), "--target", "weather", "--out", str(run), "--quiet", *fit_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    summary = json.loads((run / "run.json").read_text())
    return {"wall_s": round(wall, 2), "fit_s": summary["results"]["seconds"],
            "valid": {k: v for k, v in summary["results"].items() if k.startswith("valid_")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fit-args", default="")
    ap.add_argument("--profile", type=Path, help="write the top of a cProfile of one more run here")
    args = ap.parse_args()
    table = weather_table()
    print(f"table {table}; load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            print(fit_once(table, Path(tmp) / f"r{i}", args.fit_args.split()))
        if args.profile:
            import pstats
            import io
            print(fit_once(table, Path(tmp) / "prof", args.fit_args.split(), profile=Path(tmp) / "prof.out"),
                  "(under cProfile)")
            s = io.StringIO()
            pstats.Stats(str(Path(tmp) / "prof.out"), stream=s).sort_stats("cumulative").print_stats(90)
            args.profile.write_text(s.getvalue())
            print(f"profile: {args.profile}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
