"""Run folders as Ultralytics users expect them (runs/fit, runs/fit2, ... without --out), and a fit stopped by
Ctrl-C or SIGTERM: either a run that --resume continues, or no run folder at all."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import FASHION, REPO, run_here

PENGUINS = REPO / "data" / "penguins.csv"


def test_two_fits_without_out_land_in_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("fit", PENGUINS, "--target", "species", "--ignore", "year", "--model", "gbdt")
    first, second = run_here(*args), run_here(*args)
    assert first.code == 0 and second.code == 0, first.err + second.err
    assert "run folder: runs/fit\n" in first.out and "run folder: runs/fit2\n" in second.out, second.out
    for run in ("fit", "fit2"):
        assert json.loads((tmp_path / "runs" / run / "run.json").read_text())["config"]["out"] == f"runs/{run}"
    import itfits  # the Python API too
    third = itfits.fit(PENGUINS, target="species", ignore=["year"], model="gbdt", log=lambda *a: None)
    assert third.path == Path("runs/fit3") and (tmp_path / "runs" / "fit3" / "run.json").is_file()


def test_a_failed_fit_without_out_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = run_here("fit", PENGUINS, "--target", "no_such_column")
    assert ran.code == 1 and "error:" in ran.err
    assert not any((tmp_path / "runs").iterdir()), "a run that failed must take its auto-named folder away"


# --lr given (no lr_find), fp32 (no precision probe): the signal lands while the data is checked, or the model made
FIT = ["--epochs", "1", "--freeze-epochs", "0", "--size", "32", "--lr", "3e-3", "--bs", "16", "--workers", "0",
       "--precision", "fp32", "--seed", "5"]


def _stop_early(run, sig) -> subprocess.CompletedProcess:
    """`itfits fit` in a subprocess, sent `sig` as soon as its run folder has checkpoints/config.json (written once
    the data passed its checks, before the first epoch)."""
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "fit", str(FASHION), "--out", str(run), *FIT], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "config.json").exists():
        assert proc.poll() is None, f"fit ended before it was stopped:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_early_then_the_same_command_again_succeeds(tmp_path):
    run = tmp_path / "run"
    stopped = _stop_early(run, signal.SIGINT)
    assert stopped.returncode == 128 + signal.SIGINT and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "interrupted (SIGINT)" in stopped.stderr
    if (run / "checkpoints" / "last.pt").exists():  # the first epoch ended before the signal came: a resumable run
        assert f"itfits fit --resume {run}" in stopped.stderr
        again = run_here("fit", "--resume", run, "--workers", "0")
    else:  # no checkpoint: no run folder, so the same command starts afresh
        assert not run.exists(), sorted(map(str, run.rglob("*")))
        again = run_here("fit", FASHION, "--out", run, *FIT)
    assert again.code == 0, again.err[-3000:]
    assert (run / "model").is_dir() and (run / "run.json").is_file()


def test_sigterm_takes_the_path_of_ctrl_c(tmp_path):
    """Sent once the run has a checkpoint: the folder stays, and the way to go on is printed."""
    run = tmp_path / "run"
    three_epochs = [*FIT[2:], "--epochs", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "fit", str(FASHION), "--out", str(run), *three_epochs],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert not (run / "run.json").exists(), "the run ended before the signal came"
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err, err[-3000:]
    assert f"itfits fit --resume {run}" in err and (run / "checkpoints" / "last.pt").exists()


def test_fit_help_groups_its_options_in_panels():
    import re
    ran = run_here("fit", "--help")
    assert ran.code == 0
    panels = re.findall(r"╭─ (\w+) ─", ran.out)
    assert panels == ["Arguments", "Options", "Data", "Model", "Training", "Unknowns", "Audio", "Tables", "Output"], panels
    ema = next(line for line in ran.out.splitlines() if "--ema " in line)
    assert "--no-ema" in ema and "<bool>" not in ema, ema
