"""--balance on imbalanced classes, on a real small imbalanced copy of data/fashion (tshirt at 12 files, the others
at 60): the choice and its reason, the weighted sampler's draws, the class-weighted loss, and balanced accuracy and
per-class recall in the history, run.json, the report and evaluate."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from helpers import CLASSES, FASHION, FASHION_TEST, run_here
from pipelines.balance import IMBALANCE_RATIO, balance_metrics, choose_balance
from pipelines.errors import ItfitsError
from pipelines.metrics import balanced_accuracy, per_class

MINORITY, KEPT = "tshirt", 12  # a fifth of the 60 of each other class: 10 against 48 training files, 4.8x


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("imbalanced") / "fashion"
    shutil.copytree(FASHION, data)
    for path in sorted((data / MINORITY).iterdir())[KEPT:]:
        path.unlink()
    return data


def test_auto_chooses_weights_past_three_times_and_none_below():
    chosen = choose_balance({"a": 40, "b": 10, "c": 40}, "auto")
    assert chosen.method == "weights" and "4.0x, over 3x" in chosen.reason and "largest class a" in chosen.reason
    # every class carries the same share of the loss: weight x count equal, mean weight per item 1
    shares = [chosen.weights[c] * n for c, n in chosen.counts.items()]
    assert max(shares) == pytest.approx(min(shares)) and sum(shares) == pytest.approx(90)
    assert choose_balance({"a": 30, "b": 10}, "auto").method == "none"  # exactly 3x: not over
    forced = choose_balance({"a": 30, "b": 30}, "sampler")
    assert forced.method == "sampler" and forced.reason.startswith("--balance sampler")
    assert forced.loss_weights(["a", "b"]) is None and chosen.loss_weights(["a", "b", "c"]).tolist() == \
        pytest.approx([0.75, 3.0, 0.75])
    with pytest.raises(ItfitsError, match="--balance must be one of auto, weights, sampler, none"):
        choose_balance({"a": 1}, "oversample")
    assert IMBALANCE_RATIO == 3.0  # the rule


def test_the_sampler_draws_the_classes_about_equally(imbalanced):
    """fastai's WeightedDL with 1/n_c per item: an epoch's draws hold the minority about a quarter of the time,
    where the plain loader holds it one time in fifteen (10 of 154 training files)."""
    from fastai.callback.data import WeightedDL
    from fastai.torch_core import set_seed
    from pipelines.images import ImagePreprocessing, image_dataloaders
    from pipelines.sources import read_source
    items = read_source(imbalanced, valid_pct=0.2, seed=0)
    train = items.filter(pl.col("split") == "train")
    balance = choose_balance(dict(train.group_by("label").len().iter_rows()), "sampler")
    prep = ImagePreprocessing(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    plain = image_dataloaders(items, classes=CLASSES, prep=prep, bs=16, num_workers=0)
    dls = image_dataloaders(items, classes=CLASSES, prep=prep, bs=16, num_workers=0, weigh=balance.item_weights)
    assert isinstance(dls.train, WeightedDL) and not isinstance(plain.train, WeightedDL)
    set_seed(0)
    labels = [dls.train_ds[i][1].item() for _ in range(5) for i in dls.train.get_idxs()]
    share = Counter(labels)[CLASSES.index(MINORITY)] / len(labels)
    plain_share = (train["label"] == MINORITY).mean()
    assert plain_share < 0.07 and 0.18 < share < 0.32, (plain_share, share)
    assert len(dls.valid_ds) == len(plain.valid_ds), "validation is not resampled"


def test_balance_metrics_agree_with_numpy_per_class():
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 1, 0, 2, 2]), 3).float()
    from types import SimpleNamespace
    from fastai.torch_core import to_detach
    values = {}
    for metric in balance_metrics(["a", "b", "c"]):  # as fastai's Recorder drives them: two batches
        metric.reset()
        for half in (slice(0, 5), slice(5, 8)):
            metric.accumulate(SimpleNamespace(pred=logits[half], y=targets[half], to_detach=to_detach))
        values[metric.name] = metric.value
    recall = per_class(targets.numpy(), logits.argmax(1).numpy(), ["a", "b", "c"])
    assert values["recall_a"] == pytest.approx(recall["a"]["recall"]) == pytest.approx(0.75)
    assert values["balanced_accuracy"] == pytest.approx(balanced_accuracy(targets.numpy(), logits.argmax(1).numpy()))
    assert values["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1) / 3)


@pytest.fixture(scope="module")
def balanced_run(imbalanced, tmp_path_factory):
    run = tmp_path_factory.mktemp("balanced") / "run"
    ran = run_here("fit", imbalanced, "--out", run, "--epochs", "1", "--freeze-epochs", "0", "--size", "32", "--lr",
                   "3e-3", "--bs", "16", "--workers", "0", "--precision", "fp32")
    assert ran.code == 0, ran.err[-3000:]
    return run, ran.out


def test_auto_balances_an_imbalanced_fit_and_says_so(balanced_run):
    run, out = balanced_run
    summary = json.loads((run / "run.json").read_text())
    balance = summary["resolved"]["balance"]
    assert balance["method"] == "weights" and balance["counts"][MINORITY] < balance["counts"]["bag"] / 3
    assert f"class balance: weights (auto: largest class" in out and f"smallest {MINORITY}" in out
    assert summary["config"]["balance"] == "auto"
    history = pl.read_csv(run / "history.csv")
    assert {"balanced_accuracy", *(f"recall_{c}" for c in CLASSES)} <= set(history.columns)
    last = history.row(-1, named=True)
    assert last["balanced_accuracy"] == pytest.approx(np.mean([last[f"recall_{c}"] for c in CLASSES]), abs=1e-6)
    results = summary["results"]
    assert set(results["valid_recall"]) == set(CLASSES)
    assert results["valid_balanced_accuracy"] == pytest.approx(np.mean(list(results["valid_recall"].values())))
    page = (run / "report.html").read_text()
    assert "balanced accuracy (mean recall per class)" in page and "class balance: weights" in page


def test_evaluate_reports_balanced_accuracy_and_recall(balanced_run, tmp_path):
    run, _ = balanced_run
    ran = run_here("evaluate", run / "model", FASHION_TEST, "--out", tmp_path / "ev", "--workers", "0")
    assert ran.code == 0, ran.err[-3000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["balanced_accuracy"] == pytest.approx(np.mean([v["recall"] for v in m["per_class"].values()]))
    assert f"balanced {m['balanced_accuracy']:.3f}" in ran.out and f"{MINORITY} " in ran.out


def test_balance_options_are_checked(tmp_path):
    from pipelines.run import FitConfig
    with pytest.raises(ItfitsError, match="--balance must be one of"):
        FitConfig(data=str(FASHION), balance="smote")
    with pytest.raises(ItfitsError, match="images and audio for now"):
        FitConfig(data="t.csv", target="species", balance="sampler")
    ran = run_here("fit", FASHION, "--out", tmp_path / "r", "--balance", "oversample")
    assert ran.code == 1 and "--balance must be one of" in ran.err
