"""Fit and predict beside CPU-bound programs (issue 30): today's CPU policy against itfits' own, side by side.

Each task runs as a user runs it (`itfits ...` in a fresh interpreter, wall time from process start to exit) on a
quiet machine and beside 1 and 2 processes that spin (`python -c 'while True: pass'`), once per policy and round,
the policies alternating within each condition:

- `before`: the code of --before (a git revision, checked out into a temporary worktree), with OMP_WAIT_POLICY,
  GOMP_SPINCOUNT and OMP_NUM_THREADS unset: torch's defaults (a thread per core, OpenMP threads spinning 300,000
  times before they sleep);
- `policy`: this checkout: runtime.cpu_policy and OMP_WAIT_POLICY=PASSIVE, set by the CLI before torch loads.

Tasks: fit of data/fashion (240 images of 4 classes) at --size 64, 1+2 epochs, --lr given (no lr_find);
predict of data/fashion_test with that bundle; fit of data/penguins.csv (--target species, both learners); its
predict. Prints one row per task and condition: seconds per policy (the median of the rounds) and the ratio to the
task's quiet time under the same policy.

    python bench/contention.py [--before ef9fd31] [--rounds 1] [--busy 0,1,2] [--tasks fit,predict,table,table_predict]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPIN = [sys.executable, "-c", "while True: pass"]
CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
IMAGE_FIT = ["--size", "64", "--epochs", "2", "--freeze-epochs", "1", "--lr", "3e-3", "--seed", "0"]


def tasks(out: Path, bundle: dict[str, Path]) -> dict[str, callable]:
    """name -> (policy, run folder) -> argv of itfits; the predict tasks use the quiet round's bundle of the fit."""
    return {
        "fit": lambda p, r: ["fit", REPO / "data" / "fashion", "--out", r, *IMAGE_FIT],
        "predict": lambda p, r: ["predict", bundle[f"fit {p}"], REPO / "data" / "fashion_test", "--out", r / "p.csv"],
        "table": lambda p, r: ["fit", REPO / "data" / "penguins.csv", "--target", "species", "--ignore", "year",
                               "--out", r],
        "table_predict": lambda p, r: ["predict", bundle[f"table {p}"], REPO / "data" / "penguins.csv",
                                       "--out", r / "p.csv"],
    }


def run(code: Path, argv: list, run_dir: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PYTHONPATH"] = str(code)  # that checkout's app/ and pipelines/ before the installed (editable) ones
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "app.cli", *map(str, argv)], cwd=code, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{argv}: {proc.stdout[-1500:]}{proc.stderr[-3000:]}")
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="ef9fd31", help="git revision of today's policy")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--busy", default="0,1,2")
    ap.add_argument("--tasks", default="fit,predict,table,table_predict")
    args = ap.parse_args()
    busy_counts = [int(b) for b in args.busy.split(",")]
    names = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="contention.") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
        code = {"before": before, "policy": REPO}
        bundle: dict[str, Path] = {}
        times: dict[tuple, list[float]] = {}
        try:
            print(f"load average at start {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores", flush=True)
            for busy in busy_counts:
                spinners = [subprocess.Popen(SPIN) for _ in range(busy)]
                try:
                    for name in names:
                        for r in range(args.rounds):
                            for policy in ("before", "policy") if r % 2 == 0 else ("policy", "before"):
                                run_dir = tmp / f"{name}-{policy}-{busy}-{r}"
                                argv = tasks(tmp, bundle)[name](policy, run_dir)
                                s = run(code[policy], argv, run_dir)
                                times.setdefault((name, busy, policy), []).append(s)
                                if name in ("fit", "table"):
                                    bundle.setdefault(f"{name} {policy}", run_dir / "model")
                                print(f"{name:13s} busy {busy} {policy:6s} {s:6.1f} s", flush=True)
                finally:
                    for p in spinners:
                        p.kill()
                        p.wait()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        print("\n| task | beside | before (s) | x quiet | policy (s) | x quiet |\n|---|---|---|---|---|---|")
        for name in names:
            quiet = {p: statistics.median(times[(name, busy_counts[0], p)]) for p in ("before", "policy")}
            for busy in busy_counts:
                cells = []
                for p in ("before", "policy"):
                    s = statistics.median(times[(name, busy, p)])
                    cells += [f"{s:.1f}", f"{s / quiet[p]:.2f}"]
                print(f"| {name} | {busy} busy | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
