"""`import itfits`: the Python API gives what the CLI gives, for paths, PIL images, numpy arrays and table rows, with
one record type for every modality; importing it prints nothing and loads no torch."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from PIL import Image

from helpers import FASHION_TEST, REPO

import itfits

ONE_PNG = sorted((FASHION_TEST / "sneaker").glob("*.png"))[0]
PENGUINS = REPO / "data" / "penguins.csv"


@pytest.fixture(scope="module")
def model(trained_run):
    return itfits.load(trained_run.model, num_workers=0)


def same_prediction(record: itfits.Prediction, row: dict) -> None:
    """A Prediction against a row of the predictions table (a CSV row as `itfits predict` wrote it)."""
    assert record.label == row["label"] and record.unknown == row["unknown"] and record.error is None
    assert record.confidence == pytest.approx(row["confidence"], abs=1e-6)
    assert record.unknown_score == pytest.approx(row["score"], rel=1e-5, abs=1e-4)
    for j in (1, 2, 3):
        assert record.probabilities[row[f"top{j}"]] == pytest.approx(row[f"top{j}_prob"], abs=1e-6)
    assert list(record.probabilities)[:3] == [row["top1"], row["top2"], row["top3"]]


def test_a_pil_image_is_predicted_as_the_cli_predicts_its_file(model, trained_run, cli, tmp_path):
    out = tmp_path / "p.csv"
    ran = cli("predict", trained_run.model, ONE_PNG, "--out", out, "--workers", "0")
    assert ran.code == 0, ran.err
    row = pl.read_csv(out).row(0, named=True)
    record = model.predict(Image.open(ONE_PNG))
    assert isinstance(record, itfits.Prediction) and record.source is None
    same_prediction(record, row)
    assert sorted(record.probabilities) == sorted(trained_run.summary["resolved"]["classes"])
    assert sum(record.probabilities.values()) == pytest.approx(1, abs=1e-4)
    table = model.predict_table([Image.open(ONE_PNG)])  # the CLI's columns, the path unknown
    assert table.columns == pl.read_csv(out).columns and table["path"].to_list() == [None]


def test_a_plain_string_is_one_input(model, trained_run):
    record = model.predict(str(ONE_PNG))
    assert isinstance(record, itfits.Prediction) and record.source == str(ONE_PNG) and record.error is None
    from pipelines.bundle import load_bundle
    from pipelines.predict import PredictConfig, predict
    rows = list(predict(load_bundle(trained_run.model), str(ONE_PNG), PredictConfig(num_workers=0)))
    assert [r["path"] for r in rows] == [str(ONE_PNG)]  # not one input per character of the string
    # a folder, and a list, are many; a missing file is one record with its error, in its place
    folder = model.predict(str(ONE_PNG.parent))
    assert isinstance(folder, list) and len(folder) == len(list(ONE_PNG.parent.glob("*.png")))
    many = model.predict([ONE_PNG, "no/such.png", Image.open(ONE_PNG)])
    assert [r.source for r in many] == [str(ONE_PNG), "no/such.png", None]
    assert many[1].label is None and "not found" in many[1].error and many[0].label == many[2].label


def test_numpy_arrays_are_images(model):
    pixels = np.asarray(Image.open(ONE_PNG))
    from_pil, from_array = model.predict(Image.open(ONE_PNG)), model.predict(pixels)
    assert from_array.label == from_pil.label and from_array.confidence == pytest.approx(from_pil.confidence, abs=1e-6)
    as_floats = model.predict(pixels.astype(np.float32) / 255)  # floats in [0, 1]
    assert as_floats.confidence == pytest.approx(from_pil.confidence, abs=1e-6)
    for bad, words in [(np.zeros((3, 28, 28), np.uint8), "channels-first"), (pixels * 2.0, "[0, 1]"),
                       (pixels.astype(np.int64), "not an image")]:
        with pytest.raises(itfits.ItfitsError, match=words.replace("[", r"\[").replace("]", r"\]")):
            model.predict(bad)


def test_a_table_row_as_a_dict_or_a_pandas_series(table_run):
    model = itfits.load(table_run)
    from_file = model.predict_table(str(PENGUINS))  # what `itfits predict MODEL penguins.csv` writes
    rows = pl.read_csv(PENGUINS, infer_schema_length=0)  # as the CSV's cells, text
    first = rows.row(0, named=True)
    record = model.predict(first)
    assert isinstance(record, itfits.Prediction) and record.source is None
    same_prediction(record, from_file.row(0, named=True))
    series = model.predict(rows.to_pandas().iloc[0])
    assert (series.label, series.confidence) == (record.label, record.confidence)
    # a table and a list of rows: one record each, in order; the same record type as images
    records = model.predict(rows.head(3))
    assert [r.label for r in records] == from_file["label"].head(3).to_list()
    assert [r.label for r in model.predict([rows.row(2, named=True), first])] == [records[2].label, record.label]
    with pytest.raises(itfits.ItfitsError, match="lacks column"):
        model.predict({"island": "Biscoe"})


def test_fit_returns_the_run_with_its_learner(tmp_path):
    from fastai.learner import Learner
    run = itfits.fit(PENGUINS, target="species", ignore=["year"], model="nn", epochs=1, lr=1e-2, out=tmp_path / "run",
                     log=lambda *a: None)
    assert isinstance(run.learn, Learner) and run.bundle == tmp_path / "run" / "model"
    assert run.report == tmp_path / "run" / "report.html" and run.report.is_file()
    assert run.results["valid_accuracy"] == run.summary["results"]["valid_accuracy"] > 0.5
    assert run.load().predict(pl.read_csv(PENGUINS).row(0, named=True)).label in run.summary["resolved"]["classes"]
    with pytest.raises(itfits.ItfitsError, match="did you mean 'epochs'"):
        itfits.fit(PENGUINS, epoch=3)


def test_import_prints_nothing_and_loads_no_torch(tmp_path):
    code = ("import sys, itfits; assert 'torch' not in sys.modules, 'import itfits loaded torch'; "
            "itfits.FitConfig, itfits.load, itfits.fit; print('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    assert proc.stderr == "", f"import itfits printed:\n{proc.stderr}"
