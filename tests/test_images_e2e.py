"""Images end to end: fit -> run folder -> bundle -> predict, and the bundle predicting exactly as the Learner."""
from __future__ import annotations

import itertools
import json
import pickle
from dataclasses import fields
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from helpers import BROKEN, CLASSES, FASHION, FASHION_TEST, REPO

BASE_COLUMNS = ["path", "label", "confidence", "unknown", "error", "score"]


def top_columns(k: int) -> list[str]:
    return [c for j in range(1, k + 1) for c in (f"top{j}", f"top{j}_prob")]


# ---- the run folder ---------------------------------------------------------------------------------------

def test_run_folder_has_every_output(trained_run):
    run = trained_run.run
    for name in ["model/model.safetensors", "model/itfits.json", "history.csv", "confusion_matrix.png",
                 "confusion_matrix.csv", "run.json", "skipped.csv"]:
        assert (run / name).is_file(), f"{name} missing from the run folder"
    png = (run / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and Image.open(run / "confusion_matrix.png").size[0] > 100
    assert not [p.name for p in run.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"], "temp files left"
    assert not (run / "lr_find.csv").exists(), "--lr was given, so lr_find must not run"


def test_history_has_a_row_per_epoch(trained_run):
    history = pl.read_csv(trained_run.run / "history.csv")
    assert {"train_loss", "valid_loss", "accuracy"} <= set(history.columns)
    assert any(c in history.columns for c in ("time", "seconds")), "per-epoch time missing"
    assert history.height == 1 + 2  # --freeze-epochs 1 then --epochs 2 (fine_tune)
    if "phase" in history.columns:
        assert history["phase"].to_list() == ["frozen", "unfrozen", "unfrozen"]
    assert history.select(pl.col("train_loss", "valid_loss").is_finite().all()).row(0) == (True, True)
    assert history["train_loss"][-1] < history["train_loss"][0], "training loss did not go down"


def test_arch_auto_is_chosen_printed_and_recorded(trained_run):
    summary = trained_run.summary
    assert summary["config"]["arch"] == "auto"  # the default: what was asked for, beside what it became
    assert summary["resolved"]["arch"] == "efficientnet_lite0", "about 150 training images take the smallest body"
    assert summary["resolved"]["arch_why"].endswith("training images")
    assert f"backbone efficientnet_lite0 (--arch auto: {summary['resolved']['arch_why']})" in trained_run.stdout
    meta = json.loads((trained_run.run / "model" / "itfits.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0"
    # --epochs given (FIT_ARGS): used as given, with no reason of auto's
    assert summary["resolved"]["epochs"] == summary["config"]["epochs"] == 2
    assert summary["resolved"]["epochs_why"] is None and "; 2 epochs\n" in trained_run.stdout


def test_epochs_by_the_data_size(tmp_path):
    """Without --epochs, small data trains longer (training.AUTO_EPOCHS): chosen in the data stage, said why."""
    from pipelines.modality import get_modality
    from pipelines.prepare import prepare_data
    from pipelines.run import FitConfig
    from pipelines.training import AUTO_EPOCHS, auto_epochs
    (many, usual), (_, small_data) = AUTO_EPOCHS
    assert auto_epochs(many - 1)[0] == small_data > usual == auto_epochs(many)[0] == auto_epochs(10 * many)[0]
    assert auto_epochs(many)[1] == f"{many} training items, at least {many}"
    assert auto_epochs(12)[1] == f"12 training items, fewer than {many}"
    data = prepare_data(get_modality("image"), FitConfig(data=str(FASHION), out=str(tmp_path), num_workers=0),
                        tmp_path, log=lambda *a: None)
    n_train = len(data.dls.train_ds)
    assert (data.epochs, data.epochs_why) == auto_epochs(n_train)
    given = prepare_data(get_modality("image"), FitConfig(data=str(FASHION), out=str(tmp_path), num_workers=0,
                                                          epochs=3), tmp_path, log=lambda *a: None)
    assert (given.epochs, given.epochs_why) == (3, None)


def test_valid_accuracy_clearly_above_chance(trained_run):
    summary = trained_run.summary
    acc = summary["results"]["valid_accuracy"]
    assert acc > 0.5, f"valid accuracy {acc} on 4 classes (chance 0.25)"
    history = pl.read_csv(trained_run.run / "history.csv")
    assert history["accuracy"][-1] == pytest.approx(acc, abs=1e-6)


def test_confusion_matrix_counts_the_valid_set(trained_run):
    cm = pl.read_csv(trained_run.run / "confusion_matrix.csv")
    assert cm["actual"].to_list() == CLASSES
    assert cm.columns[1:] == CLASSES
    counts = cm.select(CLASSES).to_numpy()
    summary = trained_run.summary
    assert counts.sum() == summary["resolved"]["n_valid"]
    assert np.trace(counts) / counts.sum() == pytest.approx(summary["results"]["valid_accuracy"])


def test_run_json_records_every_setting(trained_run):
    summary = trained_run.summary
    config = summary["config"]
    from pipelines.run import FitConfig
    assert set(config) == {f.name for f in fields(FitConfig)}, "run.json must hold every FitConfig field"
    assert config["arch"] == "auto" and config["weights"] == "auto"
    assert (config["epochs"], config["freeze_epochs"], config["size"], config["bs"]) == (2, 1, 48, 16)
    assert config["lr"] == pytest.approx(3e-3) and summary["resolved"]["lr"] == pytest.approx(3e-3)
    assert summary["resolved"]["classes"] == CLASSES


def test_bundle_meta_describes_the_model(trained_run):
    meta = json.loads((trained_run.model / "itfits.json").read_text())
    assert meta["format_version"] == 1 and meta["modality"] == "image"
    assert meta["backbone"] == "efficientnet_lite0" and meta["classes"] == CLASSES
    prep = meta["preprocessing"]
    assert prep["size"] == 48 and list(prep["mean"]) == [0.5] * 3 and list(prep["std"]) == [0.5] * 3
    assert {"temperature", "threshold"} <= set(meta["calibration"])
    assert {"torch", "fastai", "timm"} <= set(meta["versions"])
    assert not [p for p in trained_run.model.iterdir() if p.suffix in (".pkl", ".pth", ".pt", ".pickle")]


def test_skipped_files_listed_with_reasons_and_training_went_on(trained_run):
    expected = BROKEN  # name -> a word its reason must contain
    skipped = pl.read_csv(trained_run.run / "skipped.csv")
    assert {"path", "label", "error"} <= set(skipped.columns)
    by_name = {Path(p).name: (label, err) for p, label, err in skipped.select("path", "label", "error").iter_rows()}
    assert set(by_name) == set(expected), "exactly the broken files are skipped, the odd valid ones are used"
    for name, word in expected.items():
        assert word in by_name[name][1].lower(), f"{name}: reason {by_name[name][1]!r} should say {word!r}"
        assert by_name[name][0] == trained_run.broken[name].parent.name
    resolved = trained_run.summary["resolved"]
    n_good = sum(1 for _ in FASHION.rglob("*.png")) + len(trained_run.odd)
    assert resolved["n_skipped"] == len(expected)
    assert resolved["n_train"] + resolved["n_valid"] == n_good
    assert "skipped" in trained_run.stdout and "skipped.csv" in trained_run.stdout


# ---- predict through the CLI --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_predictions(trained_run, cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("preds")
    res = {}
    for ext in ("csv", "parquet"):
        proc = cli("predict", trained_run.model, FASHION_TEST, "--out", out / f"p.{ext}", "--workers", "0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[ext] = (proc, out / f"p.{ext}")
    return res


def test_predict_writes_csv_and_parquet(cli_predictions):
    csv = pl.read_csv(cli_predictions["csv"][1])
    parquet = pl.read_parquet(cli_predictions["parquet"][1])
    n_test = sum(1 for _ in FASHION_TEST.rglob("*.png"))
    for df in (csv, parquet):
        assert df.height == n_test
        assert df.columns[:6] == BASE_COLUMNS
        tops = [c for c in df.columns if c.startswith("top")]
        assert tops == top_columns(3), "top-k columns (default 3) in order"
        assert df.columns.index("top1") > df.columns.index("score")
    assert parquet["path"].to_list() == csv["path"].to_list()
    assert np.allclose(parquet["top1_prob"].to_numpy(), csv["top1_prob"].to_numpy(), atol=1e-6)
    assert parquet.schema["unknown"] == pl.Boolean and parquet.schema["confidence"] == pl.Float64


def test_predict_rows_are_consistent_and_mostly_right(cli_predictions):
    df = pl.read_parquet(cli_predictions["parquet"][1])
    assert df["error"].null_count() == df.height
    assert ((df["label"] == "unknown") == df["unknown"]).all()
    known = df.filter(~pl.col("unknown"))
    assert (known["label"] == known["top1"]).all(), "label is top1 unless flagged unknown"
    probs = df.select(top_columns(3)[1::2]).to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and (np.diff(probs, axis=1) <= 1e-9).all()
    assert ((df["confidence"] >= 0) & (df["confidence"] <= 1)).all()
    assert set(df["top1"]) <= set(CLASSES)
    truth = df["path"].map_elements(lambda p: p.replace("\\", "/").split("/")[-2], return_dtype=pl.String)
    acc = (df["top1"] == truth).mean()
    assert acc > 0.5, f"test accuracy {acc} on 4 classes"


def test_predict_prints_a_summary(cli_predictions):
    proc, out = cli_predictions["csv"]
    n_test = sum(1 for _ in FASHION_TEST.rglob("*.png"))
    df = pl.read_csv(out)
    line = proc.stdout.strip().splitlines()[-1]
    assert f"{n_test} files" in line and f"flagged {df['unknown'].sum()} of {n_test} files unknown" in line
    assert "0 errors" in line
    assert str(out) in line


def test_predict_threshold_flags_by_score(trained_run, cli, tmp_path):
    out = tmp_path / "p.csv"
    proc = cli("predict", trained_run.model, FASHION_TEST / "bag", FASHION_TEST / "tshirt", "--out", out,
               "--threshold", "0.9", "--topk", "2", "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pl.read_csv(out)
    assert [c for c in df.columns if c.startswith("top")] == top_columns(2)
    assert (df["unknown"] == (df["score"] < 0.9)).all(), "unknown means score below --threshold"


def test_predict_accepts_files_folders_and_globs(trained_run, cli, tmp_path):
    one = sorted((FASHION_TEST / "bag").glob("*.png"))[0]
    out = tmp_path / "p.csv"
    proc = cli("predict", trained_run.run, one, FASHION_TEST / "sneaker", str(FASHION_TEST / "trouser" / "*.png"),
               "--out", out, "--workers", "0")  # the run folder works as MODEL too
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pl.read_csv(out)
    expected = 1 + len(list((FASHION_TEST / "sneaker").glob("*.png"))) + len(list((FASHION_TEST / "trouser").glob("*.png")))
    assert df.height == expected and df["error"].null_count() == expected


# ---- the bundle predicts what the Learner predicts -------------------------------------------------------

@pytest.fixture(scope="module")
def small_learner(tmp_path_factory):
    """A briefly trained Learner on data/fashion at 32 px, built from the library's parts."""
    from fastai.torch_core import set_seed
    from pipelines.images import ImagePreprocessing, image_dataloaders
    from pipelines.learners import image_learner
    from pipelines.backbones import get_spec
    from pipelines.sources import check_files, read_source, require_classes
    from pipelines.training import train

    items = check_files(read_source(FASHION, seed=1))
    classes = require_classes(items)
    spec = get_spec("efficientnet_lite0")
    prep = ImagePreprocessing(size=32, mean=spec.mean, std=spec.std)
    dls = image_dataloaders(items, classes=classes, prep=prep, bs=16, num_workers=0)
    set_seed(1)
    learn = image_learner(dls, "efficientnet_lite0", weights="auto", path=tmp_path_factory.mktemp("learn"))
    train(learn, epochs=1, lr=3e-3, freeze_epochs=1)
    return learn, classes, prep


def test_bundle_probabilities_equal_the_learners(small_learner, tmp_path, monkeypatch):
    from pipelines.bundle import load_bundle, save_bundle
    from pipelines.image_modality import IMAGES
    from pipelines.predict import PredictConfig, predict
    from pipelines.unknown import Calibration

    learn, classes, prep = small_learner
    probs, _ = learn.get_preds(ds_idx=1)
    paths = [row.path for row in learn.dls.valid_ds.items]
    assert len(paths) == probs.shape[0] > 0

    meta = IMAGES.bundle_meta("efficientnet_lite0", classes, prep, training={})
    # temperature 1: the Learner's softmax has none
    save_bundle(learn.model, meta, Calibration(temperature=1.0, score="max_softmax", threshold=0.5), tmp_path / "model")
    assert not [p for p in (tmp_path / "model").iterdir() if p.suffix in (".pkl", ".pth", ".pt", ".pickle")]

    def no_unpickling(*a, **k):
        raise AssertionError("loading a bundle must not unpickle")
    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    bundle = load_bundle(tmp_path / "model")
    assert bundle.classes == classes
    # fp32 outputs to compare (the default, auto, may run bf16 where the CPU is faster in it); equal up to fp32
    # rounding: prediction folds BatchNorms into convolutions and runs channels-last (about 1e-5 apart here)
    rows = list(predict(bundle, paths, PredictConfig(batch_size=7, num_workers=0, topk=len(classes), precision="fp32")))
    monkeypatch.undo()

    assert [r["path"] for r in rows] == paths and not any(r["error"] for r in rows)
    bundle_probs = np.array([[r[f"top{j}_prob"] for j in range(1, len(classes) + 1)] for r in rows])
    bundle_names = [[r[f"top{j}"] for j in range(1, len(classes) + 1)] for r in rows]
    by_class = np.zeros_like(bundle_probs)
    for i, names in enumerate(bundle_names):
        for name, p in zip(names, bundle_probs[i]):
            by_class[i, classes.index(name)] = p
    np.testing.assert_allclose(by_class, probs.numpy(), atol=1e-4, rtol=0)
    assert [r["top1"] for r in rows] == [classes[i] for i in probs.argmax(1).tolist()]


def test_large_photos_are_decoded_in_threads_with_the_same_rows(small_learner, tmp_path, monkeypatch):
    """Files slow to decode next to the model move prediction's decoding to a pool of threads; the rows equal
    those of a DataLoader worker process decoding the same files."""
    from concurrent.futures import ThreadPoolExecutor
    import pipelines.batches
    import pipelines.predict as P
    from pipelines.bundle import load_bundle, save_bundle
    from pipelines.image_modality import IMAGES
    from pipelines.unknown import Calibration

    learn, classes, prep = small_learner
    save_bundle(learn.model, IMAGES.bundle_meta("efficientnet_lite0", classes, prep, training={}),
                Calibration(temperature=1.0, score="max_softmax", threshold=0.5), tmp_path / "model")
    bundle = load_bundle(tmp_path / "model")
    paths = []  # 1600 x 1200 JPEGs: tens of ms each to decode, where the model takes about 1 ms an image at 32 px
    for i, src in enumerate(sorted(FASHION.rglob("*.png"))[:6]):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.open(src).convert("RGB").resize((1600, 1200), Image.BILINEAR).save(paths[-1], quality=90)
    pools = []

    class Spy(ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    ticks = itertools.count()

    class Clock:  # each batch: decoding 1 s, the model 0.01 s, as on any machine however loaded (no timing asserted)
        @staticmethod
        def perf_counter():
            i = next(ticks)
            return i // 3 * 10 + (0.0, 1.0, 1.01)[i % 3]  # began, decoded, after the model

    monkeypatch.setattr(pipelines.batches, "ThreadPoolExecutor", Spy)
    monkeypatch.setattr(pipelines.batches, "time", Clock)
    config = dict(batch_size=2, topk=len(classes), precision="fp32")
    threads = list(P.predict(bundle, paths, P.PredictConfig(num_workers=0, **config)))
    assert len(pools) == 1, "decoding should have moved to threads after the first batch"
    worker = list(P.predict(bundle, paths, P.PredictConfig(num_workers=1, **config)))
    assert len(pools) == 1 and [r["path"] for r in threads] == [r["path"] for r in worker] == paths
    for a, b in zip(threads, worker):
        assert a["top1"] == b["top1"] and a["error"] is None and b["error"] is None
        assert a["top1_prob"] == pytest.approx(b["top1_prob"], abs=1e-6)


def test_bundle_weights_equal_the_trained_model(small_learner, tmp_path):
    from safetensors.torch import load_file
    from pipelines.bundle import load_bundle, save_bundle
    from pipelines.image_modality import IMAGES
    from pipelines.unknown import Calibration
    learn, classes, prep = small_learner
    meta = IMAGES.bundle_meta("efficientnet_lite0", classes, prep, training={})
    save_bundle(learn.model, meta, Calibration(score="max_softmax", threshold=0.5), tmp_path / "model")
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    trained = learn.model.state_dict()
    assert set(saved) == set(trained)
    assert all(torch.equal(saved[k], trained[k].cpu()) for k in trained)
    loaded = load_bundle(tmp_path / "model").model.state_dict()
    assert all(torch.equal(loaded[k], trained[k].cpu()) for k in trained)


def test_bundles_without_unknown_statistics_evaluate_on_logit_scores(small_learner, tmp_path):
    """The Python API saves a bundle without unknown statistics; evaluate reports the scores that need none, and
    a calibration whose score needs them is an invalid bundle, not an AttributeError at prediction."""
    from pipelines.bundle import load_bundle, save_bundle
    from pipelines.image_modality import IMAGES
    from pipelines.errors import ItfitsError
    from pipelines.evaluate import evaluate
    from pipelines.unknown import LOGIT_SCORES, Calibration
    learn, classes, prep = small_learner
    meta = IMAGES.bundle_meta("efficientnet_lite0", classes, prep, training={})
    save_bundle(learn.model, meta, Calibration(score="energy", threshold=0.0), tmp_path / "model")
    metrics = evaluate(tmp_path / "model", FASHION_TEST, unknown=REPO / "data" / "fashion_unknown",
                       out=tmp_path / "evaluate", num_workers=0)
    assert set(metrics["scores"]) == set(LOGIT_SCORES) and metrics["unknown_rule"]["score"] == "energy"
    assert all(0 <= s["auroc"] <= 1 for s in metrics["scores"].values())
    save_bundle(learn.model, meta, Calibration(score="knn"), tmp_path / "knn")
    with pytest.raises(ItfitsError, match="is not a valid itfits bundle: its unknown score 'knn' needs statistics"):
        load_bundle(tmp_path / "knn")


def test_tta_averages_each_image_with_its_mirror_and_keeps_the_calibration(trained_run, cli, tmp_path):
    """--tta: the same rows and columns; each row's outputs are the bundle's calibration applied to the mean of the
    model's outputs on the image and on its mirror image (computed here on the unfolded model); off by default."""
    from pipelines.audio import MelConfig
    from pipelines.features import forward_features
    from pipelines.bundle import load_bundle
    from pipelines.errors import ItfitsError
    from pipelines.images import ImagePreprocessing, load_image
    from pipelines.batches import file_batches
    from pipelines.modality import get_modality
    from pipelines.predict import PredictConfig, predict
    files = [str(p) for p in sorted(FASHION_TEST.rglob("*.png"))[::6]]
    bundle = load_bundle(trained_run.model)
    plain = list(predict(bundle, files, PredictConfig(precision="fp32", num_workers=0)))
    rows = list(predict(bundle, files, PredictConfig(precision="fp32", num_workers=0, tta=True)))
    assert [r["path"] for r in rows] == [r["path"] for r in plain] and list(rows[0]) == list(plain[0])
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    x = prep.normalize(torch.stack([torch.from_numpy(prep.array(load_image(f, gray=True))) for f in files]))
    with torch.inference_mode():
        views = [forward_features(bundle.scoring_model.eval(), v) for v in (x, x.flip(3))]
    logits, feats = ((a + b).numpy() / 2 for a, b in zip(*views))
    probs, scores, unknown = bundle.calibration.apply(logits, feats)
    np.testing.assert_allclose([r["confidence"] for r in rows], probs.max(1), rtol=1e-3)
    np.testing.assert_allclose([r["score"] for r in rows], scores, rtol=1e-3, atol=1e-3)
    assert [r["unknown"] for r in rows] == unknown.tolist()
    assert not np.allclose([r["confidence"] for r in rows], [r["confidence"] for r in plain]), "the mirror counts"
    with pytest.raises(ItfitsError, match="--tta is for image models"):
        file_batches(bundle.model, prep, [], modality=get_modality("audio"), options=MelConfig(duration=1.0), tta=True)
    out = tmp_path / "p.csv"
    proc = cli("predict", trained_run.model, *files, "--out", out, "--workers", "0", "--precision", "fp32", "--tta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(pl.read_csv(out)["confidence"].to_numpy(), probs.max(1), rtol=1e-3)
    import shutil
    from pipelines.evaluate import evaluate
    for f in files:  # a small labelled folder: evaluate --tta scores the same views
        (tmp_path / "data" / Path(f).parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "data" / Path(f).parent.name)
    m = evaluate(trained_run.model, tmp_path / "data", out=tmp_path / "ev", num_workers=0, tta=True)
    assert m["tta"] and m["n_known"] == len(files)
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == np.array(
        [bundle.classes.index(Path(f).parent.name) for f in files])).mean()))
