"""Tables end to end on real small data (data/penguins.csv): fit -> run folder -> bundle -> predict, column
inference and overrides, missing values, unseen categories, extra columns, errors (whole column, per row, missing
column), regression, unknown flagging on a held-out species, a bundle without pickle that rebuilds the model."""
from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from helpers import REPO, run_here
from pipelines.errors import ItfitsError
from pipelines.training import CHOSEN_SUGGESTION
from pipelines.unknown import TABLE_DEFAULT_SCORE

PENGUINS = REPO / "data" / "penguins.csv"
CLASSES = ["Adelie", "Chinstrap", "Gentoo"]
INPUTS = ["island", "sex", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
OUTPUTS = ["label", "confidence", "unknown", "error", "score"] + [f"top{j}{s}" for j in (1, 2, 3) for s in ("", "_prob")]
QUIET = dict(log=lambda *a: None)


def penguins() -> pl.DataFrame:
    return pl.read_csv(PENGUINS, null_values="NA")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`itfits fit data/penguins.csv --target species` as a user runs it, lr_find included."""
    out = tmp_path_factory.mktemp("tab") / "run"
    proc = run_here("fit", PENGUINS, "--target", "species", "--ignore", "year", "--cont",
                   "body_mass_g,flipper_length_mm", "--epochs", "3", "--model", "nn", "--out", out)
    assert proc.returncode == 0, f"itfits fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="module")
def bundle(run):
    from pipelines.bundle import load_bundle
    return load_bundle(run / "model")


def predict_table(bundle, path, **config) -> pl.DataFrame:
    from pipelines.predict import PredictConfig, predict
    return pl.concat(list(predict(bundle, [str(path)], PredictConfig(**config))))


# ---- the run folder ---------------------------------------------------------------------------------------------

def test_fit_writes_the_run_folder(run):
    for name in ["model/model.safetensors", "model/itfits.json", "history.csv", "lr_find.png", "lr_find.csv",
                 "confusion_matrix.png", "confusion_matrix.csv", "run.json", "skipped.csv"]:
        assert (run / name).is_file(), f"{name} missing from the run folder"
    assert (run / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert not [p.name for p in run.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"], "temp files left"
    history = pl.read_csv(run / "history.csv")
    assert history.columns == ["epoch", "train_loss", "valid_loss", "accuracy", "seconds", "rows", "rows_per_s"]
    assert history.height == 3
    assert history["train_loss"][-1] < history["train_loss"][0]
    stdout = (run / "stdout.txt").read_text()
    assert "lr_find suggestions" in stdout and "categorical: island, sex" in stdout and "344 rows" in stdout


def test_resume_of_a_tabular_run_says_tables_keep_no_checkpoints(run):
    from pipelines.errors import ItfitsError
    from pipelines.run import resume_config
    with pytest.raises(ItfitsError, match="is a tabular run, and tabular training keeps no checkpoints"):
        resume_config(run)


def test_run_json_records_every_setting_and_the_result(run):
    from pipelines.run import FitConfig
    summary = json.loads((run / "run.json").read_text())
    config, resolved = summary["config"], summary["resolved"]
    assert set(config) == {f.name for f in fields(FitConfig)}
    assert config["target"] == "species" and config["ignore"] == ["year"]
    assert config["cont"] == ["body_mass_g", "flipper_length_mm"], "--cont a,b is split on commas"
    assert resolved["task"] == "classification" and resolved["classes"] == CLASSES
    assert resolved["cat"] == ["island", "sex"] and resolved["lr"] == resolved["lr_suggestions"][CHOSEN_SUGGESTION]
    assert resolved["n_train"] + resolved["n_valid"] == 344 and resolved["n_skipped"] == 0
    assert summary["results"]["valid_accuracy"] > 0.85, summary["results"]
    cm = pl.read_csv(run / "confusion_matrix.csv")
    counts = cm.select(CLASSES).to_numpy()
    assert cm["actual"].to_list() == CLASSES and counts.sum() == resolved["n_valid"]
    assert np.trace(counts) / counts.sum() == pytest.approx(summary["results"]["valid_accuracy"])


def test_bundle_is_json_and_safetensors_and_rebuilds_without_pickle(run, monkeypatch):
    from safetensors.torch import load_file
    from pipelines.bundle import load_bundle
    meta = json.loads((run / "model" / "itfits.json").read_text())
    assert meta["modality"] == "tabular" and meta["task"] == "classification" and meta["classes"] == CLASSES
    prep = meta["preprocessing"]
    assert prep["target"] == "species" and prep["ignore"] == ["year"]
    assert prep["vocab"]["island"] == ["#na#", "Biscoe", "Dream", "Torgersen"]
    assert prep["vocab"]["sex"] == ["#na#", "female", "male"]
    assert prep["dtypes"]["island"] == "String" and prep["dtypes"]["bill_length_mm"] == "Float64"
    train = penguins()  # statistics are from the training rows only: close to, not equal to, the whole table's
    assert prep["fill"]["body_mass_g"] == pytest.approx(train["body_mass_g"].median(), rel=0.05)
    assert prep["mean"]["bill_length_mm"] == pytest.approx(train["bill_length_mm"].mean(), rel=0.03)
    assert prep["std"]["bill_length_mm"] == pytest.approx(train["bill_length_mm"].std(), rel=0.1)
    assert set(prep["na"]) == {"bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"}
    assert meta["model"]["layers"] == [200, 100] and meta["model"]["n_cont"] == 4
    assert [n for n, _ in meta["model"]["emb_szs"]] == [4, 3, 3, 3, 3, 3]  # island, sex, four _na flags
    assert {"temperature", "score", "threshold"} <= set(meta["calibration"]) and meta["calibration"]["score"] == TABLE_DEFAULT_SCORE
    files = sorted(p.name for p in (run / "model").iterdir())
    assert files == ["itfits.json", "model.safetensors"]
    saved = load_file(str(run / "model" / "model.safetensors"))
    assert {"unknown.bank", "unknown.means", "unknown.precision"} <= set(saved)

    def no_unpickling(*a, **k):
        raise AssertionError("loading a bundle must not unpickle")
    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, no_unpickling)
    bundle = load_bundle(run / "model")
    state = bundle.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("unknown."))


def test_bundle_predicts_exactly_what_the_learner_predicts(tmp_path):
    """The prediction path (file -> parse -> encode -> model) equals the training path (prepare_table -> Learner)."""
    from pipelines.bundle import load_bundle, save_bundle
    from pipelines.modality import get_modality
    from pipelines.tabular import TabularModelSpec
    from pipelines.prepare import prepare_tabular
    from pipelines.run import FitConfig
    from pipelines.training import train
    from pipelines.unknown import Calibration
    config = FitConfig(data=str(PENGUINS), target="species", seed=1, bs=32)
    data, _, learn = prepare_tabular(config, tmp_path)
    train(learn, epochs=1, lr=1e-2, fine_tune=False)
    probs, _ = learn.get_preds(ds_idx=1)
    meta = get_modality("tabular").bundle_meta(data.prep, TabularModelSpec.for_data(data.prep).json(), training={})
    save_bundle(learn.model, meta, Calibration(temperature=1.0, score="max_softmax"), tmp_path / "model")
    rows = penguins().with_row_index("row").filter(pl.col("row").is_in(data.rows[data.valid].tolist()))
    rows.drop("row").write_csv(tmp_path / "valid.csv")
    out = predict_table(load_bundle(tmp_path / "model"), tmp_path / "valid.csv", topk=3)
    by_class = np.zeros((out.height, 3))
    for j in (1, 2, 3):
        for i, (c, p) in enumerate(zip(out[f"top{j}"], out[f"top{j}_prob"])):
            by_class[i, CLASSES.index(c)] = p
    np.testing.assert_allclose(by_class, probs.numpy(), atol=1e-5)


# ---- predictions ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def new_rows(tmp_path_factory) -> Path:
    """Rows as users send them: an unseen island, missing values, a bad number in one row, an extra column."""
    df = penguins().head(8).with_columns(pl.col("bill_length_mm").cast(pl.String), note=pl.lit("extra"))
    df = df.with_columns(island=pl.Series(["Torgersen", "Atlantis", None, "Dream", "Biscoe", "Biscoe", "Dream", "Dream"]),
                         bill_length_mm=pl.Series(["39.1", "abc", "40", None, " 41.5 ", "45", "NA", "46.2"]))
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    df.write_csv(path)
    return path


def test_cli_predict_csv_to_parquet_keeps_inputs_and_flags_rows(run, new_rows, tmp_path):
    from typer.testing import CliRunner
    from app.cli import app
    out = tmp_path / "preds.parquet"
    res = CliRunner().invoke(app, ["predict", str(run / "model"), str(new_rows), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "8 rows" in res.output and "1 errors" in res.output
    df = pl.read_parquet(out)
    inputs = pl.read_csv(new_rows).columns
    assert df.columns == inputs + OUTPUTS, "every input column in front, then the predictions"
    assert df.schema["confidence"] == pl.Float64 and df.schema["unknown"] == pl.Boolean
    assert df["note"].to_list() == ["extra"] * 8, "extra columns are kept"
    bad = df.filter(pl.col("error").is_not_null())
    assert bad.height == 1 and "bill_length_mm" in bad["error"][0] and "'abc'" in bad["error"][0]
    assert bad.select(OUTPUTS[:3] + ["score", "top1"]).null_count().row(0) == (1, 1, 1, 1, 1)
    good = df.filter(pl.col("error").is_null())
    assert good.height == 7 and good["top1"].null_count() == 0, "unseen island and missing values still predict"
    assert ((good["label"] == "unknown") == good["unknown"]).all()
    assert (good.filter(~pl.col("unknown"))["label"] == good.filter(~pl.col("unknown"))["top1"]).all()
    assert ((good["confidence"] > 0) & (good["confidence"] <= 1)).all()
    assert df["bill_length_mm"].dtype == pl.String, "a partly bad column is shown as read"
    assert df["island"][1] == "Atlantis"


def test_predict_parquet_in_csv_out_matches_csv_in(bundle, new_rows, tmp_path):
    from pipelines.predict import PredictConfig, predict, write_predictions
    pl.read_csv(new_rows).write_parquet(tmp_path / "rows.parquet")
    counts = write_predictions(predict(bundle, [str(tmp_path / "rows.parquet")], PredictConfig(topk=2)),
                               tmp_path / "p.csv")
    assert counts == {"files": 8, "unknown": counts["unknown"], "errors": 1}
    from_parquet = pl.read_csv(tmp_path / "p.csv")
    from_csv = predict_table(bundle, new_rows, topk=2)
    assert from_parquet.columns == from_csv.columns and from_parquet.columns[-4:] == ["top1", "top1_prob", "top2", "top2_prob"]
    np.testing.assert_allclose(from_parquet["top1_prob"].fill_null(-1).to_numpy(),
                               from_csv["top1_prob"].fill_null(-1).to_numpy(), atol=1e-6)
    assert from_parquet["error"].to_list() == from_csv["error"].to_list()


def test_unseen_and_missing_values_are_coded_like_fastai(bundle):
    from pipelines.tabular import TabularPreprocessing
    prep = TabularPreprocessing.from_json(bundle.meta["preprocessing"])
    rows = pl.DataFrame({"island": ["Dream", "Atlantis", None], "sex": ["male", None, "female"],
                         "bill_length_mm": [40.0, None, float("nan")], "bill_depth_mm": [18.0, 18.0, 18.0],
                         "flipper_length_mm": [190.0, 190.0, 190.0], "body_mass_g": [3800.0, 3800.0, None]})
    x_cat, x_cont = prep.encode(rows)
    assert x_cat[:, 0].tolist() == [2, 0, 0], "island: vocabulary index; unseen and missing -> #na# (0)"
    assert x_cat[:, 1].tolist() == [2, 0, 1]
    assert x_cat[:, 2].tolist() == [1, 2, 2], "bill_length_mm_na flag: missing and NaN -> true"
    filled = (prep.fill["bill_length_mm"] - prep.mean["bill_length_mm"]) / prep.std["bill_length_mm"]
    assert x_cont[1, 0] == pytest.approx(filled) and x_cont[2, 0] == pytest.approx(filled)
    assert x_cont[0, 0] == pytest.approx((40.0 - prep.mean["bill_length_mm"]) / prep.std["bill_length_mm"])


def test_missing_column_and_unreadable_column_are_errors_naming_the_column(run, bundle, new_rows, tmp_path):
    from typer.testing import CliRunner
    from app.cli import app
    pl.read_csv(new_rows).drop("sex").write_csv(tmp_path / "no_sex.csv")
    res = CliRunner().invoke(app, ["predict", str(run / "model"), str(tmp_path / "no_sex.csv"), "--out",
                                   str(tmp_path / "p.csv")])
    assert isinstance(res.exception, ItfitsError) and "sex" in str(res.exception)
    assert not (tmp_path / "p.csv").exists(), "no output on error"
    pl.read_csv(new_rows).with_columns(body_mass_g=pl.lit("heavy")).write_csv(tmp_path / "heavy.csv")
    with pytest.raises(ItfitsError, match="column 'body_mass_g'.*'heavy'"):
        predict_table(bundle, tmp_path / "heavy.csv")
    from pipelines.predict import predict
    with pytest.raises(ItfitsError, match="one table at a time"):
        list(predict(bundle, [str(new_rows)] * 2))


def test_input_columns_named_like_outputs_are_kept_with_a_suffix(bundle, new_rows, tmp_path):
    pl.read_csv(new_rows).rename({"note": "label"}).write_csv(tmp_path / "rows.csv")
    df = predict_table(bundle, tmp_path / "rows.csv")
    assert "label_input" in df.columns and df["label_input"].to_list() == ["extra"] * 8
    assert set(df["label"].drop_nulls()) <= set(CLASSES) | {"unknown"}
    pl.read_csv(new_rows).with_columns(label=pl.lit("a"), label_input=pl.lit("b")).write_csv(tmp_path / "both.csv")
    df = predict_table(bundle, tmp_path / "both.csv")
    assert df["label_input"].to_list() == ["b"] * 8 and df["label_input2"].to_list() == ["a"] * 8


def test_columns_a_csv_cannot_hold_are_an_error_before_anything_is_written(bundle, new_rows, tmp_path):
    from pipelines.predict import PredictConfig, predict, write_predictions
    pl.read_csv(new_rows).with_columns(tags=pl.concat_list("island")).write_parquet(tmp_path / "rows.parquet")
    with pytest.raises(ItfitsError, match=r"tags \(List\(String\)\).*--out p.parquet"):
        write_predictions(predict(bundle, [str(tmp_path / "rows.parquet")], PredictConfig()), tmp_path / "p.csv")
    assert list(tmp_path.iterdir()) == [tmp_path / "rows.parquet"]
    write_predictions(predict(bundle, [str(tmp_path / "rows.parquet")], PredictConfig()), tmp_path / "p.parquet")
    assert pl.read_parquet(tmp_path / "p.parquet")["tags"].to_list()[0] == ["Torgersen"]


def test_columns_of_types_the_model_cannot_read_are_errors_naming_them(bundle, tmp_path):
    """Parquet keeps types: a list, or a date where the model reads a year, is an error naming the column and its
    type, never a silent cast (a date as days since 1970) or a traceback. A float column where the model reads
    whole numbers is read where its values are whole (2007.0), as is the text '2007.0' in a CSV."""
    rows = penguins().head(6)
    rows.with_columns(island=pl.concat_list("island")).write_parquet(tmp_path / "list.parquet")
    with pytest.raises(ItfitsError, match=r"column 'island' .* type List\(String\)"):
        predict_table(bundle, tmp_path / "list.parquet")
    rows.with_columns(sex=pl.date(2020, 1, 1)).write_parquet(tmp_path / "date.parquet")
    assert predict_table(bundle, tmp_path / "date.parquet")["error"].null_count() == 6, "a date reads as text"
    rows.with_columns(bill_length_mm=pl.date(2020, 1, 1)).write_parquet(tmp_path / "date_number.parquet")
    with pytest.raises(ItfitsError, match="column 'bill_length_mm' .* type Date; the model reads it as a finite number"):
        predict_table(bundle, tmp_path / "date_number.parquet")
    from pipelines.tabular import parse_columns
    years = pl.DataFrame({"f": [2007.0, 2008.5, None], "t": ["2007.0", "2008.5", " 2009 "]})
    parsed, errors, _ = parse_columns(years, {"f": pl.Int64, "t": pl.Int64}, source="t")
    assert parsed["f"].to_list() == [2007, None, None] and parsed["t"].to_list() == [2007, None, 2009]
    assert errors[1] == "f: '2008.5' is not a whole number; t: '2008.5' is not a whole number"


def test_integers_wider_than_64_bits_train_as_categories(tmp_path):
    from pipelines.tabular import prepare_table
    big = pl.lit(2 ** 70, dtype=pl.Int128) + pl.int_range(pl.len()).cast(pl.Int128) % 3
    penguins().with_columns(tag=big).write_parquet(tmp_path / "t.parquet")
    d = prepare_table(tmp_path / "t.parquet", target="species")
    assert d.prep.dtypes["tag"] == "String" and d.prep.vocab["tag"][1:] == [str(2 ** 70 + i) for i in range(3)]


def test_infinite_values_are_row_errors_at_fit_and_predict(bundle, tmp_path):
    """inf cannot be normalised: at fit such rows are skipped with a reason (an infinite target too), at predict
    they are error rows; no NaN reaches the statistics or the confidences."""
    from pipelines.tabular import prepare_table
    row = pl.int_range(pl.len())
    df = penguins().with_columns(bill_length_mm=pl.when(row == 3).then(float("inf")).otherwise("bill_length_mm"),
                                 flipper_length_mm=pl.when(row == 7).then(float("-inf")).otherwise("flipper_length_mm")
                                 .cast(pl.Float64))
    df.write_csv(tmp_path / "inf.csv")
    d = prepare_table(tmp_path / "inf.csv", target="species")
    skipped = dict(d.skipped.iter_rows())
    assert skipped[3] == "bill_length_mm: 'inf' is not a finite number" and "flipper_length_mm: '-inf'" in skipped[7]
    assert all(np.isfinite(v) for v in [*d.prep.mean.values(), *d.prep.std.values()]) and np.isfinite(d.x_cont).all()
    d = prepare_table(tmp_path / "inf.csv", target="flipper_length_mm")
    assert dict(d.skipped.iter_rows())[7] == "target 'flipper_length_mm' is not a finite number"
    out = predict_table(bundle, tmp_path / "inf.csv")
    assert out["error"][3] == "bill_length_mm: 'inf' is not a finite number" and out["confidence"][3] is None
    assert out.filter(pl.col("error").is_null())["confidence"].is_nan().sum() == 0
    df.with_columns(body_mass_g=pl.when(row == 2).then(1e300).otherwise("body_mass_g")).write_csv(tmp_path / "big.csv")
    d = prepare_table(tmp_path / "big.csv", target="species")  # finite, but infinite as the model's float32
    assert re.fullmatch(r"body_mass_g: '1e\+?300' is not a finite number", dict(d.skipped.iter_rows())[2])
    assert all(np.isfinite(v) for v in d.prep.std.values())


def test_rows_the_model_gives_no_finite_outputs_for_are_errors(bundle, tmp_path):
    """Values within float32 but far outside the training data can overflow the model's layers: such rows are
    errors, not NaN confidences or confident labels. Here a weight of the last layer is made NaN."""
    import copy
    import dataclasses
    model = copy.deepcopy(bundle.model)
    with torch.no_grad():
        model.layers[-1][0].weight[0, 0] = float("nan")
    penguins().head(5).write_csv(tmp_path / "rows.csv")
    out = predict_table(dataclasses.replace(bundle, model=model), tmp_path / "rows.csv")
    assert out["error"].to_list() == ["the model's outputs are not finite numbers: values far outside the training "
                                      "data's range"] * 5 and out["label"].null_count() == 5


def test_a_nan_score_flags_the_row_unknown():
    from pipelines.unknown import Calibration
    logits = np.array([[2.0, 0.0], [np.nan, 0.0]], np.float32)
    _, scores, unknown = Calibration(temperature=1.0, score="max_softmax", threshold=0.5).apply(logits, None)
    assert np.isnan(scores[1]) and unknown.tolist() == [False, True]


def test_bad_headers_are_clear_errors(tmp_path):
    from pipelines.tabular import prepare_table
    (tmp_path / "dup.csv").write_text("species,island,island\nAdelie,Dream,Biscoe\n")
    with pytest.raises(ItfitsError, match="island appear more than once"):
        prepare_table(tmp_path / "dup.csv", target="species")
    (tmp_path / "semi.csv").write_text(PENGUINS.read_text().replace(",", ";"))
    with pytest.raises(ItfitsError, match="separated by ';'"):
        prepare_table(tmp_path / "semi.csv", target="species")
    penguins().with_columns(__itfits_row=1).write_csv(tmp_path / "own.csv")
    with pytest.raises(ItfitsError, match="rename __itfits_row"):
        prepare_table(tmp_path / "own.csv", target="species")
    (tmp_path / "ragged.csv").write_text("species,island\nAdelie,Dream\nGentoo,Biscoe,Dream\n")
    with pytest.raises(ItfitsError, match="a row has more fields than the header"):
        prepare_table(tmp_path / "ragged.csv", target="species")
    with pytest.raises(ItfitsError, match="is a folder; a table is a .csv or .parquet file"):
        prepare_table(tmp_path, target="species")


def test_regression_needs_two_training_rows_and_two_values(tmp_path):
    from pipelines.tabular import prepare_table
    penguins().head(3).write_csv(tmp_path / "three.csv")
    with pytest.raises(ItfitsError, match="at least 2"):
        prepare_table(tmp_path / "three.csv", target="bill_length_mm", valid_pct=0.5)
    penguins().with_columns(bill_length_mm=pl.lit(40.0)).write_csv(tmp_path / "constant.csv")
    with pytest.raises(ItfitsError, match="one value in every training row"):
        prepare_table(tmp_path / "constant.csv", target="bill_length_mm")


def test_a_table_of_no_rows_predicts_to_a_table_of_the_columns(bundle, tmp_path):
    from pipelines.predict import PredictConfig, predict, write_predictions
    penguins().head(0).write_csv(tmp_path / "empty.csv")
    for out in (tmp_path / "p.csv", tmp_path / "p.parquet"):
        counts = write_predictions(predict(bundle, [str(tmp_path / "empty.csv")], PredictConfig()), out)
        df = pl.read_csv(out) if out.suffix == ".csv" else pl.read_parquet(out)
        assert counts["files"] == 0 and df.height == 0 and df.columns == penguins().columns + OUTPUTS


def test_unknown_table_is_checked_before_training(tmp_path):
    from pipelines.run import FitConfig, fit
    for target, unknown, error in (("bill_length_mm", PENGUINS, "--unknown is for classification"),
                                   ("species", tmp_path / "none.csv", "none.csv does not exist")):
        with pytest.raises(ItfitsError, match=error):
            fit(FitConfig(data=str(PENGUINS), target=target, out=str(tmp_path / "run"), unknown=str(unknown)), **QUIET)
        assert not (tmp_path / "run" / "lr_find.csv").exists(), "the error came after lr_find"


def test_a_training_that_diverges_saves_no_model(tmp_path):
    from pipelines.run import FitConfig, fit
    with pytest.raises(ItfitsError, match="diverged.*lower --lr"):
        fit(FitConfig(data=str(PENGUINS), target="species", out=str(tmp_path / "run"), epochs=1, lr=1e8), **QUIET)
    assert not (tmp_path / "run" / "model").exists()


# ---- columns, missing values, errors at training time ----------------------------------------------------------------

def test_columns_are_inferred_like_fastai_and_overridable(tmp_path):
    from pipelines.tabular import prepare_table
    d = prepare_table(PENGUINS, target="species")
    assert d.prep.cat == ["island", "sex", "year"], "text columns and integers with <= 20 values are categorical"
    assert d.prep.cont == ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
    assert d.prep.dtypes["year"] == "Int64" and d.prep.vocab["year"] == ["#na#", "2007", "2008", "2009"]
    d = prepare_table(PENGUINS, target="species", cat=["flipper_length_mm"], cont=["year"], ignore=["island"])
    assert d.prep.cat == ["flipper_length_mm", "sex"] and "year" in d.prep.cont and "island" not in d.prep.inputs
    assert d.x_cat.shape == (344, 2 + len(d.prep.na)) and d.x_cont.shape == (344, 4)
    table = penguins().with_columns(id=pl.format("pair-{}", pl.int_range(pl.len()) // 2), tagged=pl.col("year") > 2007,
                                    ring=pl.int_range(pl.len()) % 50)
    table.write_parquet(tmp_path / "t.parquet")
    d = prepare_table(tmp_path / "t.parquet", target="species")
    assert "tagged" in d.prep.cat and d.prep.dtypes["tagged"] == "Boolean" and "ring" in d.prep.cont
    assert any("'id'" in n and "--ignore id" in n for n in d.notes), "an id-like column is pointed out"
    assert "id" in d.prep.cat, "a column with repeated values is kept (one unique per row is left out)"
    with pytest.raises(ItfitsError, match="did you mean 'island'"):
        prepare_table(PENGUINS, target="species", ignore=["islnd"])
    with pytest.raises(ItfitsError, match="both --cat and --cont"):
        prepare_table(PENGUINS, target="species", cat=["year"], cont=["year"])
    with pytest.raises(ItfitsError, match="--target"):
        prepare_table(PENGUINS, target="species", ignore=["species"])
    table.with_columns(seen=pl.duration(days=pl.int_range(pl.len()))).write_parquet(tmp_path / "d.parquet")
    with pytest.raises(ItfitsError, match="type Duration.*--ignore seen"):
        prepare_table(tmp_path / "d.parquet", target="species")


def test_missing_targets_and_unreadable_values_skip_rows_with_reasons(tmp_path):
    from pipelines.tabular import prepare_table
    df = penguins().with_columns(pl.col("bill_depth_mm").cast(pl.String))
    row = pl.int_range(pl.len())
    df = df.with_columns(bill_depth_mm=pl.when(row == 5).then(pl.lit("deep")).when(row < 12).then(pl.lit("NA"))
                         .otherwise(pl.col("bill_depth_mm")))
    df.write_csv(tmp_path / "t.csv")
    d = prepare_table(tmp_path / "t.csv", target="sex", cont=["bill_depth_mm"])
    skipped = dict(d.skipped.iter_rows())
    assert len(skipped) == 11 + 1 and d.n_rows == 344 and len(d.y) == 344 - 12
    assert skipped[5] == "bill_depth_mm: 'deep' is not a finite number"
    assert skipped[3] == "missing target 'sex'"
    assert 5 not in d.rows.tolist() and 3 not in d.rows.tolist()
    assert "bill_depth_mm" in d.prep.na, "NA in training rows gives the column a missing-value flag"
    df.with_columns(bill_depth_mm=pl.lit("deep")).write_csv(tmp_path / "bad.csv")
    with pytest.raises(ItfitsError, match="column 'bill_depth_mm'"):
        prepare_table(tmp_path / "bad.csv", target="sex", cont=["bill_depth_mm"])


def test_numbers_with_a_stray_word_are_pointed_out_and_quoted_empty_fields_are_missing(tmp_path):
    from pipelines.tabular import prepare_table
    text = PENGUINS.read_text().splitlines()
    text[1] = text[1].replace(",3750,", ",heavy,")  # body_mass_g of the first row
    text[2] = text[2].replace(",female,", ',"",')
    (tmp_path / "t.csv").write_text("\n".join(text) + "\n")
    d = prepare_table(tmp_path / "t.csv", target="species")
    assert "body_mass_g" in d.prep.cat and any("'heavy'" in n and "--cont body_mass_g" in n for n in d.notes), d.notes
    assert d.prep.vocab["sex"] == ["#na#", "female", "male"], "a quoted empty field is missing, not a category"


def test_split_is_seeded_and_stratified():
    from pipelines.tabular import prepare_table
    a, b = (prepare_table(PENGUINS, target="species", seed=3) for _ in range(2))
    assert (a.valid == b.valid).all()
    assert not (a.valid == prepare_table(PENGUINS, target="species", seed=4).valid).all()
    counts = penguins()["species"].value_counts().sort("species")["count"].to_numpy()
    assert np.bincount(a.y[a.valid]).tolist() == [round(n * 0.2) for n in counts]


def test_parse_columns_reads_words_and_numbers():
    from pipelines.tabular import parse_columns
    df = pl.DataFrame({"b": ["yes", "No", "TRUE", "0", "maybe"], "i": ["1", " 2 ", "3", None, "x"]})
    parsed, errors, bad = parse_columns(df, {"b": pl.Boolean, "i": pl.Int64}, source="t")
    assert parsed["b"].to_list() == [True, False, True, False, None] and parsed["i"].to_list() == [1, 2, 3, None, None]
    assert errors.to_list() == [None] * 4 + ["b: 'maybe' is not true/false; i: 'x' is not a whole number"]
    assert bad == ["b", "i"]



def test_training_reads_text_as_categorical_with_the_same_values(tmp_path):
    """prepare_table reads text columns as Categoricals (ids, each string hashed once): NA words are still missing,
    a column of numbers and NA words still becomes numbers, and the values equal a plain text read."""
    from pipelines.sources import read_table
    from pipelines.tabular import _median, _text_codes, _text_vocab
    text, cat = read_table(PENGUINS), read_table(PENGUINS, categorical=True)
    assert text["bill_length_mm"].dtype == pl.Float64 and text["sex"].null_count() == 11
    assert isinstance(cat["sex"].dtype, pl.Categorical) and cat.schema["bill_length_mm"] == pl.Float64
    assert cat.with_columns(pl.col(c).cast(pl.String) for c in ("species", "island", "sex")).equals(text)
    names = _text_vocab(cat["island"])
    assert names == sorted(text["island"].unique().to_list())
    codes = _text_codes(cat["sex"], {"female": 1, "male": 2}, missing=0)
    assert codes.tolist() == text["sex"].replace_strict({"female": 1, "male": 2}, default=0).to_list()
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=101), rng.normal(size=100), rng.integers(0, 5, 10).astype(float), np.array([3.0])):
        assert _median(x.copy()) == np.median(x)

# ---- regression, unknowns, the CLI's flags ---------------------------------------------------------------------------

def test_regression_on_a_float_target(tmp_path):
    from pipelines.bundle import load_bundle
    from pipelines.run import FitConfig, fit
    summary = fit(FitConfig(data=str(PENGUINS), target="bill_length_mm", out=str(tmp_path / "run"), epochs=5,
                            lr=1e-2, model="nn"), **QUIET)
    res = summary["results"]
    assert summary["resolved"]["task"] == "regression" and summary["resolved"]["classes"] == []
    assert summary["resolved"]["n_skipped"] == 2, "the two rows without a bill length"
    assert res["valid_r2"] > 0.5 and res["valid_rmse"] < penguins()["bill_length_mm"].std(), res
    assert "rmse" in pl.read_csv(tmp_path / "run" / "history.csv").columns
    assert not (tmp_path / "run" / "confusion_matrix.csv").exists()
    bundle = load_bundle(tmp_path / "run" / "model")
    assert bundle.meta["task"] == "regression" and bundle.calibration is None
    penguins().head(20).write_csv(tmp_path / "rows.csv")
    df = predict_table(bundle, tmp_path / "rows.csv")
    assert df.columns[-5:] == ["prediction", "confidence", "unknown", "error", "score"]
    known = df.filter(pl.col("bill_length_mm").is_not_null())
    assert (known["prediction"] - known["bill_length_mm"]).abs().mean() < 4.0
    assert df["confidence"].null_count() == df["unknown"].null_count() == df["score"].null_count() == 20


def test_held_out_species_is_flagged_unknown(tmp_path):
    """Trained on Adelie and Gentoo only, with half the Chinstrap rows as --unknown examples (they choose the
    score): most of the other Chinstrap rows are flagged unknown, few held-out known rows are."""
    from pipelines.bundle import load_bundle
    from pipelines.run import FitConfig, fit
    df = penguins().with_row_index("i")
    known = df.filter(pl.col("species") != "Chinstrap")
    test = known["i"].is_in(known["i"].sample(fraction=0.2, seed=0).to_list())
    known.filter(~test).drop("i").write_csv(tmp_path / "known.csv")
    known.filter(test).drop("i").write_csv(tmp_path / "known_test.csv")
    chinstrap = df.filter(pl.col("species") == "Chinstrap").drop("i")
    chinstrap.gather_every(2).write_csv(tmp_path / "chinstrap_examples.csv")
    chinstrap.gather_every(2, offset=1).write_csv(tmp_path / "chinstrap_test.csv")
    summary = fit(FitConfig(data=str(tmp_path / "known.csv"), target="species", ignore=["year"], epochs=5, lr=1e-2,
                            out=str(tmp_path / "run"), unknown=str(tmp_path / "chinstrap_examples.csv")), **QUIET)
    report = summary["calibration"]
    assert "--unknown" in report["score_chosen_by"] and set(report["unknown_examples"]) >= {"knn", "max_softmax"}
    bundle = load_bundle(tmp_path / "run" / "model")
    known_rate = predict_table(bundle, tmp_path / "known_test.csv")["unknown"].mean()
    unseen = predict_table(bundle, tmp_path / "chinstrap_test.csv")
    assert (unseen["unknown"] == (unseen["score"] < bundle.calibration.threshold)).all()
    rate = unseen["unknown"].mean()
    assert rate > 0.5 and known_rate < 0.3 and rate > 3 * known_rate, (bundle.calibration.score, rate, known_rate)


def test_cli_splits_names_and_rejects_table_flags_without_target():
    from app.options import parse_layers, parse_names
    assert parse_names(["a,b", " c ", "d,"]) == ["a", "b", "c", "d"] and parse_names(None) is None
    assert parse_layers("64,32") == [64, 32]
    with pytest.raises(ItfitsError, match="--layers"):
        parse_layers("big")
    from typer.testing import CliRunner
    from app.cli import app
    res = CliRunner().invoke(app, ["fit", str(PENGUINS), "--cat", "island"])
    assert isinstance(res.exception, ItfitsError) and "--target" in str(res.exception)


def test_web_page_predicts_uploaded_tables(run, tmp_path):
    from starlette.testclient import TestClient
    from app.web import create_app
    from pipelines.bundle import load_bundle
    from pipelines.predict import predict
    rows = penguins().head(4)
    rows.write_csv(tmp_path / "rows.csv")
    rows.drop("island").write_csv(tmp_path / "no_island.csv")
    expected = pl.concat(predict(load_bundle(run / "model"), [str(tmp_path / "rows.csv")]))
    with TestClient(create_app(run), base_url="http://localhost") as client:
        page = client.post("/predict", files=[("files", ("rows.csv", (tmp_path / "rows.csv").read_bytes())),
                                              ("files", ("no_island.csv", (tmp_path / "no_island.csv").read_bytes()))])
    assert page.status_code == 200
    for label in expected["top1"]:
        assert label in page.text
    assert "lacks column(s) the model was trained on: island" in page.text


def test_cli_rejects_image_training_flags_with_target(tmp_path):
    """--ema, --accum, --precision, ... do nothing to fastai's tabular model: an error, not a run.json that says
    `ema: true` of a training without one."""
    from typer.testing import CliRunner
    from app.cli import app
    for flags, named in [(["--ema"], "--ema"), (["--accum", "2", "--precision", "bf16"], "--precision, --accum"),
                         (["--arch", "resnet18", "--size", "64"], "--arch, --size"), (["--compile"], "--compile"),
                         (["--freeze-epochs", "0"], "--freeze-epochs"), (["--duration", "1"], "--duration")]:
        res = CliRunner().invoke(app, ["fit", str(PENGUINS), "--target", "species", *flags])
        assert isinstance(res.exception, ItfitsError) and named in str(res.exception), (flags, res.output)
    from pipelines.run import FitConfig, fit, run_lr_find
    with pytest.raises(ItfitsError, match="--ema"):  # the Python API too
        fit(FitConfig(data=str(PENGUINS), target="species", ema=True, out=str(tmp_path / "run")))
    with pytest.raises(ItfitsError, match="--arch"):  # and lr-find, which shares fit's preparation
        run_lr_find(FitConfig(data=str(PENGUINS), target="species", arch="resnet18", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


# ---- tables as people have them: dates, ids, overfitting ------------------------------------------------------------

def dated_penguins(tmp_path) -> Path:
    """The penguins with an ISO date (one a day from 2007-12-20: month, quarter and year ends) and a bird id."""
    df = penguins()
    start = pl.date(2007, 12, 20)
    days = pl.date_range(start, start.dt.offset_by(f"{df.height - 1}d"), eager=True)
    df = df.with_columns(seen=days.dt.strftime("%Y-%m-%d"), bird=pl.format("bird-{}", pl.int_range(pl.len())))
    df.write_csv(tmp_path / "dated.csv")
    return tmp_path / "dated.csv"


def test_date_parts_are_fastais_add_datepart_for_text_and_parquet_dates(tmp_path):
    """A CSV column of ISO dates and a Parquet Date column give the same model inputs: fastai's date parts (compared
    with fastai's own add_datepart), not a category with one value per row; an id column is left out, saying so."""
    import pandas as pd
    from fastai.tabular.core import add_datepart
    from pipelines.columns import DATE_PARTS
    from pipelines.tabular import prepare_table
    csv = dated_penguins(tmp_path)
    d = prepare_table(csv, target="species")
    parts = [f"seen_{p}" for p in DATE_PARTS + ("Elapsed",)]
    assert d.prep.dates == {"seen": {"format": "%Y-%m-%d", "time": False}} and set(parts) <= set(d.prep.inputs)
    assert "seen" not in d.prep.inputs and "bird" not in d.prep.inputs and "bird" in d.prep.ignore
    assert any("'bird'" in n and "--cat bird" in n for n in d.notes) and any("'seen' read as dates" in n for n in d.notes)
    assert d.prep.columns[0] == "seen" and "seen_Year" not in d.prep.columns
    pl.read_csv(csv).with_columns(pl.col("seen").str.to_date()).write_parquet(tmp_path / "dated.parquet")
    p = prepare_table(tmp_path / "dated.parquet", target="species")
    assert p.prep.inputs == d.prep.inputs and p.prep.dates["seen"]["format"] is None
    np.testing.assert_array_equal(p.x_cat, d.x_cat)
    np.testing.assert_array_equal(p.x_cont, d.x_cont)
    from pipelines.tabular import expand_dates
    ours, _ = expand_dates(pl.read_csv(csv).select("seen"), d.prep.dates, source=csv)
    # nanoseconds: fastai's Elapsed divides by 10**9 whatever the unit (pandas 2 parses these to microseconds)
    seen = pd.to_datetime(pl.read_csv(csv)["seen"].to_list()).astype("datetime64[ns]")
    theirs = add_datepart(pd.DataFrame({"seen": seen}), "seen", prefix="seen_")
    assert ours.columns == list(theirs.columns) == parts
    for c in parts:
        np.testing.assert_array_equal(ours[c].to_numpy().astype(float), theirs[c].to_numpy().astype(float), err_msg=c)
    assert ours["seen_Is_year_end"].sum() == 1 and ours["seen_Is_quarter_start"].sum() > 1
    kept = prepare_table(csv, target="species", cat=["bird", "seen"])
    assert {"bird", "seen"} <= set(kept.prep.cat) and kept.prep.dates == {}, "--cat keeps a column as it is"


def test_a_dated_table_fits_and_predicts_its_date_parts_from_csv_and_parquet(tmp_path):
    """fit records the dates and ids in run.json and the bundle; predict reads the date column of a CSV or of a
    Parquet file into the same parts (same outputs as the trained model's on its validation rows), and a row whose
    date does not read is an error row naming the column."""
    from pipelines.bundle import load_bundle
    from pipelines.tabular import TabularPreprocessing, prepare_table, tabular_outputs
    from pipelines.run import FitConfig, fit
    csv = dated_penguins(tmp_path)
    lines = []
    summary = fit(FitConfig(data=str(csv), target="species", out=str(tmp_path / "run"), epochs=2, lr=1e-2,
                            model="nn"), log=lines.append)
    assert any("note: column 'bird'" in line for line in lines) and any("'seen' read as dates" in x for x in lines)
    assert summary["resolved"]["dates"] == {"seen": {"format": "%Y-%m-%d", "time": False}}
    assert "bird" in summary["resolved"]["ignore"]
    bundle = load_bundle(tmp_path / "run" / "model")
    prep = TabularPreprocessing.from_json(bundle.meta["preprocessing"])
    assert prep.dates == summary["resolved"]["dates"] and "seen_Dayofyear" in prep.inputs
    data = prepare_table(csv, target="species")
    logits, _ = tabular_outputs(bundle.model, *data.part(True)[:2])
    rows = pl.read_csv(csv, null_values="NA")[data.rows[data.valid].tolist()].drop("bird")  # predict needs no id
    rows.write_csv(tmp_path / "rows.csv")
    rows.with_columns(pl.col("seen").str.to_date()).write_parquet(tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        out = predict_table(bundle, tmp_path / name, topk=3)
        assert out["error"].null_count() == out.height and out.columns[:rows.width] == rows.columns
        assert out["top1"].to_list() == [CLASSES[i] for i in logits.argmax(1)], name
    rows.with_columns(seen=pl.when(pl.int_range(pl.len()) == 1).then(pl.lit("2008-02-30")).otherwise("seen")) \
        .write_csv(tmp_path / "bad.csv")
    out = predict_table(bundle, tmp_path / "bad.csv")
    assert out["error"][1] == "seen: '2008-02-30' is not a date (%Y-%m-%d)" and out["error"].null_count() == out.height - 1
    rows.drop("seen").write_csv(tmp_path / "undated.csv")
    with pytest.raises(ItfitsError, match="lacks column.*seen"):
        predict_table(bundle, tmp_path / "undated.csv")


def test_tabular_training_keeps_the_epoch_of_lowest_validation_loss(tmp_path):
    """A category with one value per row (an id, here given with --cat) lets the model memorise the training rows:
    validation loss falls, then rises. The run keeps the weights of the best epoch and says which."""
    from pipelines.bundle import load_bundle
    from pipelines.tabular import prepare_table, tabular_outputs
    from pipelines.run import FitConfig, fit
    csv = dated_penguins(tmp_path)
    config = FitConfig(data=str(csv), target="sex", cat=["bird"], ignore=["seen"], valid_pct=0.5, bs=16, epochs=10,
                       lr=1e-2, out=str(tmp_path / "run"), seed=0, model="nn")
    lines = []
    summary = fit(config, log=lines.append)
    losses = pl.read_csv(tmp_path / "run" / "history.csv")["valid_loss"]
    kept = summary["resolved"]["kept_epoch"]
    assert kept == losses.arg_min() and kept < losses.len() - 1, f"the set-up should overfit: {losses.to_list()}"
    assert summary["results"]["valid_loss"] == pytest.approx(losses.min())
    assert any(f"kept the weights of epoch {kept}" in line for line in lines)
    data = prepare_table(csv, target="sex", cat=["bird"], ignore=["seen"], valid_pct=0.5, seed=0)
    x_cat, x_cont, y = data.part(True)
    logits, _ = tabular_outputs(load_bundle(tmp_path / "run" / "model").model, x_cat, x_cont)
    loss = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(y)).item()
    assert loss == pytest.approx(losses.min(), rel=1e-4) and loss < losses[-1]


def test_bundles_from_before_dates_still_predict(bundle, tmp_path):
    """An itfits.json without `dates` (bundles written before dates were expanded) loads and predicts."""
    from pipelines.bundle import load_bundle
    shutil.copytree(bundle.path, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "itfits.json").read_text())
    del meta["preprocessing"]["dates"]
    (tmp_path / "old" / "itfits.json").write_text(json.dumps(meta))
    out = predict_table(load_bundle(tmp_path / "old"), PENGUINS)
    assert out.height == 344 and out["error"].null_count() == 344
    assert out["top1"].to_list() == predict_table(bundle, PENGUINS)["top1"].to_list()


def test_a_datetime_column_gives_the_time_parts_too_at_fit_and_predict(tmp_path):
    """Text of date and time of day ("2008-01-05 13:45:10") becomes fastai's add_datepart(time=True) parts (Hour,
    Minute, Second besides the date's), the same at predict from the bundle alone, and the id beside it (unique per
    row) is left out at fit and not needed at predict."""
    import pandas as pd
    from fastai.tabular.core import add_datepart
    from pipelines.bundle import load_bundle
    from pipelines.columns import TIME_PARTS, expand_dates
    from pipelines.run import FitConfig, fit
    from pipelines.tabular import prepare_table, tabular_outputs
    df = penguins()
    every = pl.duration(seconds=pl.int_range(pl.len()) * 25397)  # 7 h 3 min 17 s apart: every hour, many minutes
    df = df.with_columns(at=(pl.datetime(2008, 1, 5, 13, 45, 10) + every).dt.strftime("%Y-%m-%d %H:%M:%S"),
                         tag=pl.format("t{}", pl.int_range(pl.len())))
    csv = tmp_path / "timed.csv"
    df.write_csv(csv)
    data = prepare_table(csv, target="species")
    assert data.prep.dates == {"at": {"format": "%Y-%m-%d %H:%M:%S%.f", "time": True}}
    assert {f"at_{p}" for p in TIME_PARTS} <= set(data.prep.inputs) and "tag" in data.prep.ignore
    ours, _ = expand_dates(pl.read_csv(csv).select("at"), data.prep.dates, source=csv)
    at = pd.to_datetime(pl.read_csv(csv)["at"].to_list()).astype("datetime64[ns]")
    theirs = add_datepart(pd.DataFrame({"at": at}), "at", prefix="at_", time=True)
    assert ours.columns == list(theirs.columns)
    for c in ours.columns:
        np.testing.assert_array_equal(ours[c].to_numpy().astype(float), theirs[c].to_numpy().astype(float), err_msg=c)
    assert ours["at_Hour"].n_unique() == 24 and ours["at_Minute"].n_unique() > 1

    summary = fit(FitConfig(data=str(csv), target="species", out=str(tmp_path / "run"), epochs=1, lr=1e-2,
                            model="nn"), **QUIET)
    assert summary["resolved"]["dates"] == data.prep.dates and "tag" in summary["resolved"]["ignore"]
    bundle = load_bundle(tmp_path / "run" / "model")
    logits, _ = tabular_outputs(bundle.model, *data.part(True)[:2])
    rows = pl.read_csv(csv, null_values="NA")[data.rows[data.valid].tolist()].drop("tag")
    rows.write_csv(tmp_path / "rows.csv")
    out = predict_table(bundle, tmp_path / "rows.csv")
    assert out["error"].null_count() == out.height
    assert out["top1"].to_list() == [CLASSES[i] for i in logits.argmax(1)]


def test_a_table_trains_for_the_tables_default_epochs_printed_and_in_run_json(tmp_path):
    """Without --epochs a table trains TABLE_EPOCHS epochs of fit_one_cycle (the default bench/table_suite.py chose),
    says so, and records it; --epochs still sets it, and then nothing is said."""
    from pipelines.tabular import TABLE_EPOCHS
    out = tmp_path / "run"
    proc = run_here("fit", PENGUINS, "--target", "species", "--lr", "1e-2", "--model", "nn", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"epochs {TABLE_EPOCHS} (the default for tables; --epochs sets it)" in proc.stdout
    summary = json.loads((out / "run.json").read_text())
    assert summary["config"]["epochs"] is None and summary["resolved"]["epochs"] == TABLE_EPOCHS == 20
    assert pl.read_csv(out / "history.csv").height == TABLE_EPOCHS
    proc = run_here("fit", PENGUINS, "--target", "species", "--lr", "1e-2", "--epochs", "2", "--model", "nn",
                    "--out", tmp_path / "two")
    assert proc.returncode == 0 and "the default for tables" not in proc.stdout
    assert json.loads((tmp_path / "two" / "run.json").read_text())["resolved"]["epochs"] == 2
    assert pl.read_csv(tmp_path / "two" / "history.csv").height == 2


def test_evaluate_of_a_tabular_model_says_where_its_figures_are(table_run, tmp_path):
    """evaluate runs labelled files; a model of table rows gets one line naming run.json and predict instead."""
    ran = run_here("evaluate", table_run / "model", PENGUINS, "--out", tmp_path / "evaluate")
    assert ran.code == 1 and "is a tabular model; itfits evaluate takes models of labelled files" in ran.err
    assert "run.json" in ran.err and "Traceback" not in ran.err and not (tmp_path / "evaluate").exists()
