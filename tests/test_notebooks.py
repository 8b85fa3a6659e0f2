"""Every notebook in notebooks/ runs top to bottom on the sample data, in a kernel on this interpreter that
imports this checkout's code; notebooks are committed without outputs."""
from __future__ import annotations

import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "itfits-test-python"
# Files each notebook must have written under ITFITS_RUNS (the notebooks of other modalities add theirs).
EXPECTED = {"01_images.ipynb": ["01_images/report.html", "01_images/model/itfits.json", "01_images/evaluate/metrics.json",
                                "01_images/evaluate/report.html"],
            "02_audio.ipynb": ["02_audio/report.html", "02_audio/model/itfits.json"],
            "03_tabular.ipynb": ["03_tabular/run/report.html", "03_tabular/run/model/itfits.json"],
            "04_python_api.ipynb": ["04_python_api/model/itfits.json", "04_python_api_table/model/itfits.json"]}
# Text each notebook must have printed.
EXPECTED_TEXT = {"02_audio.ipynb": ["valid accuracy", "unknown"], "03_tabular.ipynb": ["Chinstrap flagged unknown"],
                 "04_python_api.ipynb": ["Learner model report.html", "Adelie"]}


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> str:
    """A kernelspec running sys.executable: the `python3` one may name another interpreter (a bare `python`
    on PATH, or a system-wide spec), on a fresh clone in CI as much as here."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "itfits tests", "language": "python"}))
    return str(root)


def test_notebooks_exist():
    assert any(p.name == "01_images.ipynb" for p in NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch, jupyter_path):
    runs = tmp_path / "runs"
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("ITFITS_RUNS", str(runs))  # outputs go to a temp folder, not into the checkout's runs/
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    for name in EXPECTED.get(path.name, []):
        assert (runs / name).is_file(), f"{path.name} did not write {name}"
    assert runs.is_dir() and any(runs.iterdir()), f"{path.name} wrote nothing under ITFITS_RUNS"
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for expected in EXPECTED_TEXT.get(path.name, []):
        assert expected in text, f"{path.name} did not print {expected!r}"
