"""Multi-label images on the real small sample (data/multilabel: 64x64 pictures of one to three Fashion-MNIST items):
fit -> bundle with per-class thresholds -> predict (several labels, unknown rows, error rows) -> evaluate (F1, mAP);
the metrics against hand-computed values; bad labels tables as one clear error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from helpers import REPO, run_here
from pipelines.errors import ItfitsError

SAMPLE = REPO / "data" / "multilabel" / "labels.csv"
SAMPLE_TEST = REPO / "data" / "multilabel_test" / "labels.csv"
CLASSES = ["bag", "sneaker", "trouser", "tshirt"]


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> Path:
    """`fit` on the multi-label sample, tiny: 32 px, one frozen and one unfrozen epoch, lr given."""
    from pipelines.run import FitConfig, fit
    out = tmp_path_factory.mktemp("multilabel") / "run"
    fit(FitConfig(data=str(SAMPLE), out=str(out), epochs=1, freeze_epochs=1, size=32, lr=3e-3, bs=16, num_workers=0),
        log=lambda *a, **k: None)
    return out


# ---- training, the run folder and the bundle

def test_fit_writes_f1_and_map_and_a_bundle_with_thresholds(ml_run):
    summary = json.loads((ml_run / "run.json").read_text())
    results = summary["results"]
    assert summary["resolved"]["multi_label"] and summary["resolved"]["classes"] == CLASSES
    for key in ("valid_macro_f1", "valid_micro_f1", "valid_map"):
        assert 0 <= results[key] <= 1, key
    assert set(results["valid_per_class"]) == set(CLASSES)
    assert {"precision", "recall", "f1", "average_precision", "support"} <= set(results["valid_per_class"]["bag"])
    history = pl.read_csv(ml_run / "history.csv")
    assert {"accuracy_multi", "f1_macro", "f1_micro"} <= set(history.columns)  # BCE training's metrics
    meta = json.loads((ml_run / "model" / "itfits.json").read_text())
    assert meta["multi_label"] is True
    thresholds = meta["calibration"]["thresholds"]
    assert len(thresholds) == len(CLASSES) and all(0 < t < 1 for t in thresholds)
    assert summary["calibration"]["thresholds"] == dict(zip(CLASSES, thresholds))
    page = (ml_run / "report.html").read_text()
    assert "macro F1" in page and "mAP" in page and "multi-label" in page
    per_class = pl.read_csv(ml_run / "per_class.csv")
    assert per_class["class"].to_list() == CLASSES and "f1" in per_class.columns


def test_bundle_loads_and_its_thresholds_are_checked(ml_run, tmp_path):
    from pipelines.bundle import load_bundle
    bundle = load_bundle(ml_run / "model")
    assert bundle.multi_label and bundle.calibration.multi_label and len(bundle.calibration.thresholds) == 4

    def tampered(change) -> Path:
        folder = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ml_run / "model", folder)
        meta = json.loads((folder / "itfits.json").read_text())
        change(meta)
        (folder / "itfits.json").write_text(json.dumps(meta))
        return folder

    for change, words in [(lambda m: m["calibration"].pop("thresholds"), "needs calibration.thresholds"),
                          (lambda m: m["calibration"].update(thresholds=[0.5]), "one per class"),
                          (lambda m: m["calibration"].update(thresholds=[0.5, 2, 0.5, 0.5]), "[0, 1]"),
                          (lambda m: m.update(multi_label="yes"), "true or false"),
                          (lambda m: m.pop("multi_label"), "belong to a multi-label model")]:
        with pytest.raises(ItfitsError, match="not a valid itfits bundle") as e:
            load_bundle(tampered(change))
        assert words in str(e.value)
    # a bundle of the shape older, single-label itfits wrote (no multi_label, no thresholds) loads as one
    old = load_bundle(tampered(lambda m: (m.pop("multi_label"), m["calibration"].pop("thresholds"))))
    assert not old.multi_label and not old.calibration.multi_label


# ---- prediction

def test_predict_lists_several_labels_flags_unknown_and_keeps_error_rows(ml_run, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(SAMPLE_TEST.parent / "images", inputs)
    Image.new("L", (64, 64)).save(inputs / "blank.png")  # none of the classes
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "preds.csv"
    ran = run_here("predict", ml_run / "model", inputs, "--out", out)
    assert ran.code == 0, ran.err
    preds = pl.read_csv(out)
    assert preds.columns[:7] == ["path", "label", "labels", "confidence", "unknown", "error", "score"]
    broken = preds.filter(pl.col("path").str.ends_with("broken.png")).row(0, named=True)
    assert broken["error"] and broken["label"] is None and broken["labels"] is None
    ok = preds.filter(pl.col("error").is_null())
    assert ok.filter(pl.col("labels").str.contains(";")).height >= 5, "no row lists several labels"
    flagged = ok.filter(pl.col("unknown"))
    assert (flagged["label"] == "unknown").all() and (ok.filter(~pl.col("unknown"))["label"] == ok.filter(
        ~pl.col("unknown"))["labels"]).all()
    assert ok.filter(pl.col("path").str.ends_with("blank.png"))["unknown"].item(), "a blank picture is not unknown"


def test_no_class_above_its_threshold_is_unknown():
    """The rule on the scores alone: sigmoid probabilities against per-class thresholds (the unknown score at -inf
    accepts every row, so only the thresholds decide)."""
    from pipelines.predict import multilabel_frame
    from pipelines.unknown import Calibration
    calib = Calibration(temperature=1.0, score="max_logit", threshold=float("-inf"), thresholds=[0.5, 0.7, 0.9])
    logits = np.log(np.array([[0.6, 0.8, 0.1], [0.4, 0.6, 0.85], [0.1, 0.1, 0.95]]) /
                    (1 - np.array([[0.6, 0.8, 0.1], [0.4, 0.6, 0.85], [0.1, 0.1, 0.95]])))
    probs, scores, unknown = calib.apply(logits, None)
    assert probs == pytest.approx(np.array([[0.6, 0.8, 0.1], [0.4, 0.6, 0.85], [0.1, 0.1, 0.95]]))
    assert unknown.tolist() == [False, True, False]
    frame = multilabel_frame(probs, scores, unknown, [None, None, "cannot decode"], ["a", "b", "c"],
                             thresholds=calib.thresholds, topk=2)
    assert frame["labels"].to_list() == ["a;b", "", None]
    assert frame["label"].to_list() == ["a;b", "unknown", None]
    assert frame["top1"].to_list()[:2] == ["b", "c"]


# ---- evaluate

def test_evaluate_gives_per_class_f1_macro_micro_and_map(ml_run, tmp_path):
    out = tmp_path / "eval"
    ran = run_here("evaluate", ml_run / "model", SAMPLE_TEST, "--out", out, "--unknown", REPO / "data" / "fashion_unknown")
    assert ran.code == 0, ran.err
    assert "macro F1" in ran.out and "mAP" in ran.out
    m = json.loads((out / "metrics.json").read_text())
    assert m["multi_label"] and m["n_known"] == 48
    f1s = [v["f1"] for v in m["per_class"].values()]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    aps = [v["average_precision"] for v in m["per_class"].values()]
    assert m["map"] == pytest.approx(np.mean(aps)) and 0 < m["map"] <= 1
    assert 0 <= m["micro_f1"] <= 1 and m["unknown_rule"]["none_above"] >= 0
    assert "pretrained_mahalanobis" in m["scores"] and 0 <= m["unknown_rule"]["unknown_flagged"] <= 1


# ---- the metrics, against values computed by hand

def test_multilabel_metrics_hand_computed():
    from pipelines.metrics import multilabel_metrics
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
    d = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]])
    m = multilabel_metrics(y, d, d.astype(float), ["a", "b", "c"])
    # a: tp 2 -> P R F1 1; b: tp 1, fn 1 -> P 1, R .5, F1 2/3; c: tp 0, fp 1, fn 2 -> 0
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx([1, 2 / 3, 0])
    assert (m["per_class"]["b"]["precision"], m["per_class"]["b"]["recall"]) == pytest.approx((1, 0.5))
    assert m["per_class"]["c"]["support"] == 2
    assert m["macro_f1"] == pytest.approx(5 / 9)
    assert m["micro_f1"] == pytest.approx(6 / 10)  # 2 TP / (2 TP + FP + FN) = 6 / (6 + 1 + 3)
    assert m["subset_accuracy"] == pytest.approx(0.25) and m["label_accuracy"] == pytest.approx(8 / 12)


def test_average_precision_known_values():
    from pipelines.metrics import average_precision, multilabel_metrics
    # scikit-learn's documented example: average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8333...
    assert average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(5 / 6)
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie: one threshold
    assert average_precision(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == pytest.approx(1.0)
    assert np.isnan(average_precision(np.array([0, 0]), np.array([0.3, 0.2])))
    # mAP over the classes with a positive item only
    y = np.array([[1, 0], [0, 0], [1, 0]])
    p = np.array([[0.9, 0.2], [0.5, 0.1], [0.4, 0.3]])  # class 0: AP (1 + 2/3) / 2
    m = multilabel_metrics(y, p > 0.5, p, ["a", "b"])
    assert m["map"] == pytest.approx(5 / 6) and m["per_class"]["b"]["average_precision"] is None


def test_thresholds_maximise_each_class_f1():
    from pipelines.metrics import best_f1_thresholds
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.9, 0.3], [0.6, 0.8, 0.2], [0.4, 0.7, 0.1], [0.1, 0.1, 0.0]])
    # class 0: the best cut keeps 0.9 and 0.6 (F1 1): halfway to 0.4; class 1: keeping three (F1 0.8) beats one
    # (0.667) and two (0.5): halfway from 0.7 to 0.1; class 2 has no positive item: the default
    assert best_f1_thresholds(y, p).tolist() == pytest.approx([0.5, 0.4, 0.5])


# ---- reading labels

def _table(tmp_path: Path, rows: list[str], header: str = "path,labels") -> Path:
    src = REPO / "data" / "multilabel" / "images"
    for i in range(len(rows)):
        shutil.copy(src / f"ml_{i:03d}.png", tmp_path / f"{i}.png")
    table = tmp_path / "t.csv"
    table.write_text(header + "\n" + "\n".join(f"{i}.png,{cell}" for i, cell in enumerate(rows)) + "\n")
    return table


def test_labels_cells_spaces_semicolons_and_empty(tmp_path):
    from pipelines.sources import read_source
    items = read_source(_table(tmp_path, ["bag sneaker", "tshirt", "", "sneaker bag bag"]))
    assert items["labels"].to_list() == [["bag", "sneaker"], ["tshirt"], [], ["bag", "sneaker"]]
    assert items["error"].null_count() == 4, "an empty labels cell is a file of none of the classes, not an error"
    items = read_source(_table(tmp_path, ["ankle boot;bag", "bag", " ankle boot ; sneaker "]))
    assert items["labels"].to_list() == [["ankle boot", "bag"], ["bag"], ["ankle boot", "sneaker"]]


def test_multi_label_flag_reads_label_cells_and_single_labels_still_work(tmp_path):
    from pipelines.multilabel import label_classes
    from pipelines.sources import read_source
    items = read_source(_table(tmp_path, ["bag;sneaker", "bag", "sneaker", "tshirt", "tshirt", "bag"], header="path,label"),
                        multi_label=True)
    assert items["labels"].to_list()[:2] == [["bag", "sneaker"], ["bag"]]
    folders = read_source(REPO / "data" / "fashion", multi_label=True)  # one class per file: still a run
    assert (folders["labels"].list.len() == 1).all()
    assert label_classes(folders) == CLASSES


@pytest.mark.parametrize("rows,header,words", [
    (['"bag,sneaker"', "bag"], "path,labels", "holds ','"),  # a quoted cell
    (["bag|sneaker", "bag"], "path,labels", "holds '|'"),
    (["bag;sneaker", "bag sneaker"], "path,labels", "use one separator"),
    (["bag", "sneaker"], "path,label,labels", "both a label and a labels column"),
])
def test_bad_labels_table_is_one_clear_error(tmp_path, rows, header, words):
    table = _table(tmp_path, rows)
    if header != "path,labels":
        table.write_text(header + "\n" + "".join(f"{i}.png,{c},{c}\n" for i, c in enumerate(rows)))
    ran = run_here("fit", table, "--out", tmp_path / "run", "--epochs", "1", "--size", "32")
    assert ran.code == 1 and ran.err.startswith("error: ") and words in ran.err, ran.err
    assert "Traceback" not in ran.err and not (tmp_path / "run").exists()


def test_multi_label_options_that_do_not_apply_are_refused(tmp_path):
    from pipelines.run import FitConfig, fit
    with pytest.raises(ItfitsError, match="--multi-label is for images"):
        FitConfig(data=str(REPO / "data" / "penguins.csv"), target="species", multi_label=True)
    with pytest.raises(ItfitsError, match="--balance sampler is for single-label runs"):
        fit(FitConfig(data=str(SAMPLE), out=str(tmp_path / "run"), balance="sampler", size=32), log=lambda *a: None)
    with pytest.raises(ItfitsError, match="need at least 2 classes"):
        fit(FitConfig(data=str(_table(tmp_path, ["bag", "bag", ""])), out=str(tmp_path / "run2"), size=32),
            log=lambda *a: None)


def test_multi_label_flag_on_class_folders_trains_a_multi_label_model(tmp_path):
    """--multi-label on DATA whose every file has one class: a multi-label run all the same (sigmoids, thresholds)."""
    run = tmp_path / "run"
    ran = run_here("fit", REPO / "data" / "fashion", "--multi-label", "--out", run, "--epochs", "1", "--size", "32",
                   "--lr", "3e-3", "--workers", "0", "--quiet")
    assert ran.code == 0, ran.err
    meta = json.loads((run / "model" / "itfits.json").read_text())
    assert meta["multi_label"] and meta["classes"] == CLASSES and len(meta["calibration"]["thresholds"]) == 4


def test_check_of_a_labels_table_counts_classes_not_combinations(tmp_path):
    ran = run_here("check", SAMPLE, "--out", tmp_path / "check.csv")
    assert ran.code == 0, ran.err
    counts = pl.read_csv(SAMPLE).with_columns(pl.col("labels").fill_null("").str.split(" ")).explode("labels")
    assert f"bag {counts.filter(pl.col('labels') == 'bag').height}" in ran.out  # a file counts once per class
    assert "no mislabel pass" in ran.out  # confident learning takes one class per file


def test_onnx_export_of_a_multi_label_model_predicts_the_same_labels(ml_run, tmp_path):
    import onnx
    onnx_file = tmp_path / "model.onnx"
    ran = run_here("export", ml_run / "model", "--format", "onnx", "--out", onnx_file)
    assert ran.code == 0, ran.err[-3000:]
    props = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    assert "sigmoid" in props["outputs"] and "thresholds" in json.loads(props["calibration"])
    tables = {}
    # the ONNX file runs fp32; the bundle's auto precision is its training's, bf16 where fit's CPU probe chose it
    for name, model, extra in (("bundle", ml_run / "model", ["--precision", "fp32"]), ("onnx", onnx_file, [])):
        ran = run_here("predict", model, SAMPLE_TEST.parent / "images", "--out", tmp_path / f"{name}.csv", *extra)
        assert ran.code == 0, ran.err[-3000:]
        tables[name] = pl.read_csv(tmp_path / f"{name}.csv").sort("path")
    assert tables["onnx"].columns == tables["bundle"].columns
    for column in ("path", "label", "labels", "unknown"):
        assert tables["onnx"][column].to_list() == tables["bundle"][column].to_list(), column
