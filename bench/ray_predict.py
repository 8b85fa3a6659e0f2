"""Files per second of `itfits predict --engine ray` against the local engine on the same files (bench/BENCHMARKS.md).

    OMP_NUM_THREADS=1 python bench/ray_predict.py            # 2,400 files, 64 px, 2 rounds

A small bundle is trained first (data/fashion, 1 epoch at --size px; its accuracy does not matter here), and
--files PNGs are copied from data/fashion and data/fashion_test. Each round runs every variant once, as a user runs
it (`itfits predict` in a fresh process; wall time, interpreter start-up included), in an order that rotates
between rounds, so background load falls on all alike; the table holds medians over rounds.
  local          --engine local, --out preds.parquet (one process; torch's threads: OMP_NUM_THREADS)
  ray xN         --engine ray --concurrency N, --out a folder of part files: a local Ray instance started by the
                 command on this machine's cores, N actors each loading the bundle once
Every variant's rows are checked against the local engine's (same labels) so a fast wrong answer cannot win.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "data" / "fashion", REPO / "data" / "fashion_test"]


def itfits(*args, env=None) -> float:
    """Seconds `itfits ARGS` took; fails loudly."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"itfits {' '.join(map(str, args[:3]))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


def make_inputs(out: Path, n: int) -> Path:
    files = sorted(p for s in SOURCES for p in s.rglob("*.png"))
    for i in range(n):
        src = files[i % len(files)]
        dst = out / src.parent.name / f"{i:05d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=2400)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", default="1,2", help="actor counts of the ray variants")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    import polars as pl
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}  # nothing leaves the machine
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fit_s = itfits("fit", REPO / "data" / "fashion", "--out", tmp / "run", "--epochs", "1", "--freeze-epochs", "0",
                       "--size", a.size, "--lr", "3e-3", "--bs", "16", env=env)
        inputs = make_inputs(tmp / "inputs", a.files)
        variants = {"local": ["--out", tmp / "local.parquet"]}
        for n in a.concurrency.split(","):
            variants[f"ray x{n}"] = ["--out", tmp / f"ray{n}", "--engine", "ray", "--concurrency", n]
        times = {k: [] for k in variants}
        names = list(variants)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(itfits("predict", tmp / "run" / "model", inputs, "--batch-size", a.batch_size,
                                          *variants[name], env=env))
        local = pl.read_parquet(tmp / "local.parquet").sort("path")
        for name, args in variants.items():
            out = Path(args[1])
            got = pl.read_parquet(out / "*.parquet" if out.is_dir() else out).sort("path")
            assert got["path"].to_list() == local["path"].to_list() and got["label"].to_list() == local["label"].to_list(), name
    print(f"{a.files} files of {a.size} px, batches of {a.batch_size}, {os.cpu_count()} cores, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; fit {fit_s:.0f} s; medians of {a.rounds} rounds, wall time "
          "of the whole command (start-up included)")
    base = statistics.median(times["local"])
    print(f"| engine | seconds | files/s | vs local | per round (s) |\n|---|---|---|---|---|")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"| {name} | {s:.1f} | {a.files / s:.0f} | {base / s:.2f}x | {', '.join(f'{t:.1f}' for t in ts)} |")


if __name__ == "__main__":
    main()
