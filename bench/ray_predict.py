"""Files per second of `itfits predict --engine ray` against the local engine on the same files (bench/BENCHMARKS.md).

    OMP_NUM_THREADS=1 python bench/ray_predict.py            # 2,400 files, 64 px, 2 rounds

A small bundle is trained first (data/fashion, 1 epoch at --size px; its accuracy does not matter here), and
--files PNGs are copied from data/fashion and data/fashion_test (the first --small of them form a second, small
input). Each round runs every variant once on each input, as a user runs it (`itfits predict` in a fresh process;
wall time, interpreter start-up included), in an order that rotates between rounds, so background load falls on all
alike; the table holds medians over rounds. The two sizes split each variant's time into a fixed cost (start-up:
Python, Ray, actors loading the bundle) and a per-file rate: (files - small) / (seconds - seconds of small), the
rate that decides a large job.
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


def make_inputs(out: Path, n: int, small: int) -> tuple[Path, Path]:
    """n PNGs under out/large, the first `small` of them also under out/small."""
    files = sorted(p for s in SOURCES for p in s.rglob("*.png"))
    for i in range(n):
        src = files[i % len(files)]
        for size, folder in ((n, "large"), (small, "small")):
            if i < size:
                dst = out / folder / src.parent.name / f"{i:05d}_{src.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    return out / "large", out / "small"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=2400)
    p.add_argument("--small", type=int, default=400)
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
        large, small = make_inputs(tmp / "inputs", a.files, a.small)
        variants = {"local": ["--out", "local.parquet"]}
        for n in a.concurrency.split(","):
            variants[f"ray x{n}"] = ["--out", f"ray{n}", "--engine", "ray", "--concurrency", n]
        times = {(k, size): [] for k in variants for size in ("large", "small")}
        names = list(variants)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for size, inputs in (("large", large), ("small", small)):
                    out, *rest = variants[name][1:]
                    times[name, size].append(itfits("predict", tmp / "run" / "model", inputs, "--batch-size",
                                                    a.batch_size, "--out", tmp / f"{size}_{out}", *rest, env=env))
        local = pl.read_parquet(tmp / "large_local.parquet").sort("path")
        for name, args in variants.items():
            out = tmp / f"large_{args[1]}"
            got = pl.read_parquet(out / "*.parquet" if out.is_dir() else out).sort("path")
            assert got["path"].to_list() == local["path"].to_list() and got["label"].to_list() == local["label"].to_list(), name
    print(f"{a.files} files (and {a.small}) of {a.size} px, batches of {a.batch_size}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; fit {fit_s:.0f} s; medians of {a.rounds} "
          "rounds, wall time of the whole command (start-up included)")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| engine | {a.files} files: s | files/s | vs local | {a.small} files: s | fixed cost s | per-file rate, "
          f"files/s | vs local | rounds ({a.files}; {a.small}) |\n|---|---|---|---|---|---|---|---|---|")
    rate = {k: (a.files - a.small) / max(med[k, "large"] - med[k, "small"], 1e-9) for k in variants}
    for name in variants:
        big, little = med[name, "large"], med[name, "small"]
        fixed = big - a.files / rate[name]
        print(f"| {name} | {big:.1f} | {a.files / big:.0f} | {med['local', 'large'] / big:.2f}x | {little:.1f} | "
              f"{fixed:.1f} | {rate[name]:.0f} | {rate[name] / rate['local']:.2f}x | "
              f"{', '.join(f'{t:.1f}' for t in times[name, 'large'])}; "
              f"{', '.join(f'{t:.1f}' for t in times[name, 'small'])} |")


if __name__ == "__main__":
    main()
