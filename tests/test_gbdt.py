"""Gradient-boosted trees for tables (pipelines/gbdt.py, table_learners.py) on real small tables: the bundle in
LightGBM's own text format predicts exactly what the trained model does, a changed model file is refused,
`--model auto` keeps the better learner where the answer is known, and bad rows get the network's errors."""
from __future__ import annotations

import json
import pickle

import numpy as np
import polars as pl
import pytest
import torch

from helpers import REPO
from pipelines.errors import ItfitsError

PENGUINS = REPO / "data" / "penguins.csv"
QUIET = dict(log=lambda *a: None)


def fit_table(tmp_path, data=PENGUINS, **config) -> dict:
    from pipelines.run import FitConfig, fit
    config = {"target": "species", "ignore": ["year"], **config}
    return fit(FitConfig(data=str(data), out=str(tmp_path), **config), **QUIET)


def predict_rows(model, path) -> pl.DataFrame:
    from pipelines.bundle import load_bundle
    from pipelines.predict import PredictConfig, predict
    return pl.concat(list(predict(load_bundle(model), [str(path)], PredictConfig(topk=3))))


@pytest.fixture(scope="module")
def gbdt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gbdt") / "run"
    return out, fit_table(out, model="gbdt")


def test_the_bundle_holds_lightgbm_text_and_predicts_what_the_trained_model_does(gbdt_run, tmp_path, monkeypatch):
    from pipelines.bundle import load_bundle
    from pipelines.gbdt import MODEL_FILE, train_gbdt
    from pipelines.tabular import prepare_table
    run, summary = gbdt_run
    assert summary["resolved"]["learner"] == "gbdt" and summary["results"]["model"] == "gbdt"
    assert sorted(p.name for p in (run / "model").iterdir()) == ["itfits.json", MODEL_FILE, "model.safetensors"]
    meta = json.loads((run / "model" / "itfits.json").read_text())
    assert meta["model"]["kind"] == "gbdt" and set(meta["files"]) == {MODEL_FILE}
    assert (run / "model" / MODEL_FILE).read_text().startswith("tree\n"), "LightGBM's own text format"
    # the same training (seeded, deterministic) in memory: the bundle's outputs equal its outputs exactly
    data = prepare_table(PENGUINS, target="species", ignore=["year"], seed=42)
    trained = train_gbdt(data, seed=42)

    def no_unpickling(*a, **k):
        raise AssertionError("loading a bundle must not unpickle")
    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, no_unpickling)
    bundle = load_bundle(run / "model")
    x_cat, x_cont = data.x_cat, data.x_cont
    for got, want in zip(bundle.model.outputs(x_cat, x_cont), trained.model.outputs(x_cat, x_cont)):
        np.testing.assert_array_equal(got, want)
    # and the prediction path (file -> parse -> encode -> trees -> calibration) equals the trained model's
    rows = pl.read_csv(PENGUINS, null_values="NA").with_row_index("row").filter(
        pl.col("row").is_in(data.rows[data.valid].tolist())).drop("row")
    rows.write_csv(tmp_path / "valid.csv")
    out = predict_rows(run / "model", tmp_path / "valid.csv")
    probs, scores, _ = bundle.calibration.apply(*trained.model.outputs(*data.part(True)[:2]))
    np.testing.assert_array_equal(out["top1_prob"].to_numpy(), probs.max(1))
    np.testing.assert_array_equal(out["score"].to_numpy(), scores.astype(np.float64))
    assert out["top1"].to_list() == [bundle.classes[i] for i in probs.argmax(1)]


def test_a_changed_or_missing_model_file_is_refused(gbdt_run, tmp_path):
    import shutil
    from pipelines.bundle import load_bundle
    from pipelines.gbdt import MODEL_FILE
    model = tmp_path / "model"
    shutil.copytree(gbdt_run[0] / "model", model)
    text = (model / MODEL_FILE).read_text()
    i = text.index("leaf_value=") + len("leaf_value=")
    (model / MODEL_FILE).write_text(text[:i] + ("9" if text[i] != "9" else "8") + text[i + 1:])  # one digit
    with pytest.raises(ItfitsError, match=f"{MODEL_FILE} is not the file itfits wrote"):
        load_bundle(model)
    (model / MODEL_FILE).unlink()
    with pytest.raises(ItfitsError, match=f"{MODEL_FILE} cannot be read"):
        load_bundle(model)


def test_bad_rows_get_the_same_errors_from_the_trees_as_from_the_network(gbdt_run, tmp_path):
    nn = tmp_path / "nn"
    fit_table(nn, model="nn", epochs=1, lr=1e-2)
    rows = pl.read_csv(PENGUINS, null_values="NA").head(6).with_columns(
        island=pl.Series(["Torgersen", "Atlantis", None, "Dream", "Biscoe", "Biscoe"]),  # unseen and missing
        bill_length_mm=pl.Series(["39.1", "abc", "40", None, "1e400", "45"]))  # a word, an infinite number
    rows.write_csv(tmp_path / "rows.csv")
    trees, net = predict_rows(gbdt_run[0] / "model", tmp_path / "rows.csv"), predict_rows(nn / "model",
                                                                                            tmp_path / "rows.csv")
    assert trees["error"].to_list() == net["error"].to_list()
    assert trees["error"].null_count() == 4 and "'abc'" in trees["error"][1]
    assert trees.filter(pl.col("error").is_null())["top1"].null_count() == 0, "unseen and missing values predict"
    rows.drop("sex").write_csv(tmp_path / "no_sex.csv")
    errors = []
    for model in (gbdt_run[0] / "model", nn / "model"):
        with pytest.raises(ItfitsError, match="lacks column.*sex") as e:
            predict_rows(model, tmp_path / "no_sex.csv")
        errors.append(str(e.value))
    assert errors[0] == errors[1]


def stripes_and_slope(tmp_path, n: int = 320):
    """Two tables of 2 classes: `stripes` alternates along one number in 8 bands (thresholds: trees), `slope` is one
    side of an oblique plane through 8 numbers (a weighted sum: a network)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8))
    cols = {f"x{j}": x[:, j].round(4) for j in range(8)}
    stripes = np.where((np.floor((x[:, 0] + 3) * 4 / 3) % 2) == 0, "a", "b")
    slope = np.where(x @ np.linspace(1, -1, 8) + 0.3 * x[:, 0] > 0, "a", "b")
    pl.DataFrame({**cols, "y": stripes}).write_csv(tmp_path / "stripes.csv")
    pl.DataFrame({**cols, "y": slope}).write_csv(tmp_path / "slope.csv")
    return tmp_path / "stripes.csv", tmp_path / "slope.csv"


def test_auto_keeps_the_learner_that_validates_better(tmp_path):
    stripes, slope = stripes_and_slope(tmp_path)
    kept = {}
    for name, table in (("stripes", stripes), ("slope", slope)):
        summary = fit_table(tmp_path / name, data=table, target="y", ignore=[], epochs=8, lr=1e-2)
        models, results = summary["results"]["models"], summary["results"]
        assert set(models) == {"nn", "gbdt"} and results["model"] == summary["resolved"]["learner"]
        best = max(models, key=lambda k: models[k]["valid_accuracy"])
        assert models[best]["valid_accuracy"] > models[{"nn": "gbdt", "gbdt": "nn"}[best]]["valid_accuracy"]
        assert results["model"] == best and results["valid_accuracy"] == models[best]["valid_accuracy"]
        kept[name] = best
        report = (tmp_path / name / "report.html").read_text()
        assert "Models trained on the same split" in report and "(kept)" in report
    assert kept == {"stripes": "gbdt", "slope": "nn"}


def test_model_flag_is_checked_before_any_data_is_read(tmp_path):
    from pipelines.run import FitConfig
    with pytest.raises(ItfitsError, match="--model 'trees' is not one of auto, nn, gbdt, blend"):
        FitConfig(data=str(PENGUINS), target="species", model="trees")
    with pytest.raises(ItfitsError, match="--model are for tables"):
        FitConfig(data=str(REPO / "data" / "fashion"), model="gbdt")
    with pytest.raises(ItfitsError, match="--epochs, --lr: for the network"):
        FitConfig(data=str(PENGUINS), target="species", model="gbdt", epochs=3, lr=1e-3)


def test_regression_trees_predict_in_the_targets_units(tmp_path):
    summary = fit_table(tmp_path / "run", target="body_mass_g", model="gbdt")
    assert summary["resolved"]["task"] == "regression" and summary["results"]["valid_rmse"] < 500
    out = predict_rows(tmp_path / "run" / "model", PENGUINS)
    truth = pl.read_csv(PENGUINS, null_values="NA")["body_mass_g"].to_numpy()
    ok = ~np.isnan(truth)
    assert np.sqrt(np.nanmean((out["prediction"].to_numpy()[ok] - truth[ok]) ** 2)) < 500  # std of the mass: 800


def test_a_regression_under_auto_weighs_the_blend_and_keeps_the_lowest_rmse(tmp_path):
    summary = fit_table(tmp_path / "run", target="body_mass_g", epochs=3, lr=1e-2)
    models = summary["results"]["models"]
    assert set(models) == {"nn", "gbdt", "blend"}
    assert summary["results"]["model"] == min(models, key=lambda k: models[k]["valid_rmse"])


def test_a_blend_bundle_predicts_the_mean_of_its_two_models(tmp_path):
    from pipelines.bundle import load_bundle
    from pipelines.modality import get_modality
    from pipelines.table_learners import LEARNERS, learner_of
    summary = fit_table(tmp_path / "run", model="blend", epochs=3, lr=1e-2)
    assert summary["results"]["model"] == "blend" and set(summary["results"]["models"]) == {"nn", "gbdt", "blend"}
    bundle = load_bundle(tmp_path / "run" / "model")
    assert bundle.meta["model"]["kind"] == "blend" and set(bundle.meta["files"]) == {"model.lgb.txt"}
    prep = get_modality("tabular").preprocessing(bundle.meta)
    _, parsed, _ = prep.read_rows(PENGUINS)
    x_cat, x_cont = prep.encode(parsed)
    blend = learner_of(bundle.meta["model"])
    logits, _ = blend.outputs(bundle.model, x_cat, x_cont)
    a, _ = LEARNERS["nn"].outputs(bundle.model.network, x_cat, x_cont)
    b, _ = LEARNERS["gbdt"].outputs(bundle.model.trees, x_cat, x_cont)
    mean = (torch.softmax(torch.from_numpy(a).double(), 1) + torch.softmax(torch.from_numpy(b).double(), 1)) / 2
    np.testing.assert_allclose(np.exp(logits), mean.numpy(), rtol=1e-5, atol=1e-6)
    out = predict_rows(tmp_path / "run" / "model", PENGUINS)
    assert out.height == pl.read_csv(PENGUINS, null_values="NA").height and out["error"].is_null().all()


def test_a_name_column_of_many_values_keeps_its_frequent_values_with_a_note(tmp_path):
    from pipelines.tabular import RARE, prepare_table
    rng = np.random.default_rng(1)
    names = [f"name {i}" for i in rng.integers(0, 150, 240)] + ["common"] * 30
    df = pl.DataFrame({"name": names, "x": rng.normal(size=270), "y": rng.choice(["u", "v"], 270)})
    df.write_csv(tmp_path / "cars.csv")
    data = prepare_table(tmp_path / "cars.csv", target="y")
    train = df.filter(pl.Series(np.isin(np.arange(270), data.rows[~data.valid])))["name"].value_counts()
    frequent = sorted(train.filter(pl.col("count") >= RARE)["name"].to_list())
    assert data.prep.vocab["name"] == ["#na#", *frequent] and "common" in frequent
    assert any("column 'name' has" in n and f"seen {RARE} or more times" in n for n in data.notes)
