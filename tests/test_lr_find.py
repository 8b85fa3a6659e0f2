"""lr_find: `itfits lr-find` writes its plot and table and prints the suggestions; `itfits fit` without --lr
runs it first and uses (and records) the suggestion it names (CHOSEN_SUGGESTION)."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from helpers import FASHION, REPO, run_cli, run_here
from pipelines.training import CHOSEN_SUGGESTION

SUGGESTIONS = ("minimum", "steep", "valley", "slide")
SMALL = ["--size", "32", "--bs", "8", "--workers", "0"]  # lr_find runs a fixed number of batches: small ones


def _check_lr_find_files(folder):
    table = pl.read_csv(folder / "lr_find.csv")
    assert table.columns == ["lr", "loss"] and table.height >= 20
    lrs = table["lr"].to_numpy()
    assert (np.diff(lrs) > 0).all() and lrs[-1] / lrs[0] > 100, "lr grows over orders of magnitude"
    assert np.isfinite(table["loss"].to_numpy()).all()
    with Image.open(folder / "lr_find.png") as im:
        assert im.format == "PNG" and im.size[0] >= 300
    return table


def test_lr_find_command(tmp_path):
    out = tmp_path / "lr"
    proc = run_cli("lr-find", FASHION, "--out", out, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = _check_lr_find_files(out)
    lines = proc.stdout.strip().splitlines()
    printed = {line.split()[0]: float(line.split()[1]) for line in lines if line.split()[:1] and line.split()[0] in SUGGESTIONS}
    assert set(printed) == set(SUGGESTIONS), proc.stdout
    assert all(table["lr"].min() <= v <= table["lr"].max() for v in printed.values())
    assert [line.split()[0] for line in lines if "itfits fit uses this" in line] == [CHOSEN_SUGGESTION]
    assert "lr_find.png" in lines[-1] and "lr_find.csv" in lines[-1]
    assert not (out / "model").exists() and not (out / "history.csv").exists(), "lr-find does only lr_find"


@pytest.mark.slow  # lr_find, then training and calibration
def test_fit_without_lr_uses_the_chosen_suggestion(tmp_path):
    run = tmp_path / "run"
    proc = run_here("fit", FASHION, "--out", run, "--epochs", "1", "--freeze-epochs", "1", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_lr_find_files(run)
    summary = json.loads((run / "run.json").read_text())
    assert summary["config"]["lr"] is None
    suggestions = summary["resolved"]["lr_suggestions"]
    assert set(suggestions) == set(SUGGESTIONS)
    assert summary["resolved"]["lr"] == suggestions[CHOSEN_SUGGESTION] > 0
    assert "lr_find suggestions" in proc.stdout and f"using {CHOSEN_SUGGESTION} {suggestions[CHOSEN_SUGGESTION]:.2e}" in proc.stdout
    assert (run / "model" / "model.safetensors").is_file()


def test_short_lr_find_drops_the_suggestions_it_cannot_make(tmp_path):
    """20 iterations leave 13 usable points: too few for fastai's slide rule (it needs more than 15), which used to
    crash the fit; the other suggestions still come, and the chosen one is used."""
    from pipelines.run import FitConfig, fit
    summary = fit(FitConfig(data=str(REPO / "data" / "penguins.csv"), target="body_mass_g", out=str(tmp_path / "run"),
                            epochs=1, lr_find_iters=20, model="nn"), log=lambda *a: None)
    suggestions = summary["resolved"]["lr_suggestions"]
    assert "slide" not in suggestions and CHOSEN_SUGGESTION in suggestions
    assert summary["resolved"]["lr"] == suggestions[CHOSEN_SUGGESTION] > 0


def test_lr_find_is_seeded_as_fit_and_leaves_no_empty_folder(tmp_path):
    """`itfits lr-find` seeds before making its DataLoaders (their shuffling seed is drawn then) and runs in the
    precision fit resolves, as fit does before its lr_find: the same settings give the same suggestions every
    time. fastai's lr_find keeps the weights in checkpoints/ meanwhile; no empty folder is left behind."""
    from dataclasses import replace

    from pipelines.run import FitConfig, run_lr_find
    config = FitConfig(data=str(FASHION), out=str(tmp_path / "a"), size=32, bs=8, num_workers=0, lr_find_iters=15,
                       precision="fp32")
    first = run_lr_find(config)
    assert run_lr_find(replace(config, out=str(tmp_path / "b"))) == first
    assert not (tmp_path / "a" / "checkpoints").exists()
