"""Shared fixtures: one real training run on the sample images (with broken and odd-mode files mixed into
the classes), the CLI as a user runs it, and odd images.

The run is trained once per session through the CLI in a subprocess, exactly as `itfits fit` runs, so tests
see what a user sees: a fresh interpreter, where nothing another test imported can hide a missing import. Most
other CLI tests run the command in this process (helpers.run_here): each subprocess costs seconds of imports.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import CLASSES, FASHION, FIT_ARGS, run_cli, run_here, write_broken_files, write_odd_images


@pytest.fixture(scope="session", autouse=True)
def mel_cache(tmp_path_factory) -> Path:
    """Rendered spectrograms go to a fresh folder, never ~/.cache; CLI subprocesses and notebook kernels inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("itfits_cache")
        mp.setenv("ITFITS_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def cli():
    """`itfits ARGS` in this process (helpers.run_here); run_cli is the subprocess, one test per command."""
    return run_here


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    return write_odd_images(tmp_path_factory.mktemp("odd"))


@dataclass(frozen=True)
class TrainedRun:
    run: Path  # the run folder
    data: Path  # the DATA folder it was trained on
    broken: dict[str, Path]  # files that must have been skipped: name -> path
    odd: dict[str, Path]  # odd-mode but valid images that must have been used: kind -> path
    stdout: str

    @property
    def model(self) -> Path:
        return self.run / "model"

    @property
    def summary(self) -> dict:
        return json.loads((self.run / "run.json").read_text())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """`itfits fit` on a copy of data/fashion with broken files and odd-mode images mixed into the classes."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "fashion"
    shutil.copytree(FASHION, data)
    broken = {}
    for i, (name, path) in enumerate(sorted(write_broken_files(root / "broken").items())):
        broken[name] = data / CLASSES[i % len(CLASSES)] / name  # spread over the classes
        shutil.move(path, broken[name])
    odd = {}
    for kind, path in write_odd_images(root / "odd").items():
        odd[kind] = data / "bag" / path.name
        shutil.move(path, odd[kind])
    run = root / "run"
    proc = run_cli("fit", data, "--out", run, *FIT_ARGS)
    assert proc.returncode == 0, f"itfits fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return TrainedRun(run=run, data=data, broken=broken, odd=odd, stdout=proc.stdout)


@pytest.fixture(scope="session")
def table_run(tmp_path_factory) -> Path:
    """A tabular run folder: LightGBM's trees on data/penguins.csv (species), in-process, in a second (the network's
    own predictions are tests/test_tabular.py's run)."""
    from helpers import REPO
    from pipelines.run import FitConfig, fit
    out = tmp_path_factory.mktemp("table") / "run"
    fit(FitConfig(data=str(REPO / "data" / "penguins.csv"), target="species", ignore=["year"], model="gbdt",
                  out=str(out)), log=lambda *a: None)
    return out


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's count of cases (README records it)."""
    import sys
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.COUNT["cases"]:
        terminalreporter.write_line(f"fuzz: {fuzz.COUNT['cases']} generated bad inputs ran through fit, predict and "
                                    f"serve (seed {fuzz.SEED})")
