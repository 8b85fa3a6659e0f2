"""RUN/report.html: one self-contained page built from what training computed (no model runs), every string
escaped; its plots and tables are files in RUN too. Classifiers and regressions (a table with a continuous target)."""
from __future__ import annotations

import base64
import html
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from helpers import CLASSES, FASHION, REPO
from pipelines.plots import losses_figure
from pipelines.reports import TOP_LOSSES, Validation, item_losses, write_report

PLOTS = ["losses.png", "confusion_matrix.png", "reliability.png", "risk_coverage.png"]


def image_sources(page: str) -> list[str]:
    return re.findall(r"<img[^>]*\ssrc=[\"']([^\"']*)[\"']", page)


def assert_self_contained(page: str):
    srcs = image_sources(page)
    assert srcs, "no images in the report"
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:80]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG"
    assert not re.search(r"<(script|link|iframe)\b", page), "the report must load nothing"
    assert "http://" not in page and "https://" not in page


# ---- the report of a real run (tests/conftest.py: `itfits fit` with broken files mixed in) ------------------

def test_fit_writes_the_report_and_its_files(trained_run):
    run = trained_run.run
    for name in ["report.html", "per_class.csv", "top_losses.csv", *PLOTS]:
        assert (run / name).is_file(), f"{name} missing from the run folder"
    page = (run / "report.html").read_text()
    assert_self_contained(page)
    for name in PLOTS:  # the embedded plots are the files in RUN
        assert base64.b64encode((run / name).read_bytes()).decode() in page, f"{name} not embedded"
    for heading in ["Settings", "Learning rate finder", "Loss and metrics", "Confusion matrix", "Per class",
                    "Top ", "Calibration and unknowns", "Skipped files"]:
        assert f"<h2>{heading}" in page, f"no section {heading!r}"
    assert "report.html" in trained_run.stdout, "fit should say where the report is"


def test_report_shows_settings_and_calibration(trained_run):
    page = (trained_run.run / "report.html").read_text()
    summary = trained_run.summary
    assert "efficientnet_lite0" in page and "freeze_epochs" in page and "n_valid" in page
    assert "lr_find did not run" in page  # the tests' fit gives --lr
    calib = summary["calibration"]
    assert f"{calib['temperature']:.4g}" in page and f"{calib['threshold']:.4g}" in page
    assert calib["score"] in page
    for name in trained_run.broken:  # skipped files, each with its reason
        assert html.escape(name) in page


def test_report_leads_with_results_and_ends_with_settings(trained_run):
    """Summary and what to look at first, then the figures; the settings last, the changed ones shown and the rest
    folded; records (precision, mel) read as text, not as Python dicts."""
    page = (trained_run.run / "report.html").read_text()
    headings = re.findall(r"<h2>([^<(]*)", page)
    assert headings[0] == "Summary" and headings[-1] == "Settings", headings
    assert headings.index("Confusion matrix ") < headings.index("Loss and metrics") < headings.index("Settings")
    summary = page.split("<h2>Summary</h2>", 1)[1].split("<h2>", 1)[0]
    calib = trained_run.summary["calibration"]
    assert "valid accuracy" in summary and "worst item" in summary
    # the most confused pair where there is one (the sample is easy: a run can make no validation mistake)
    assert ("most confused" in summary) == (trained_run.summary["results"]["valid_accuracy"] < 1)
    assert f"{calib['score']} &gt;= {calib['threshold']:.4g}" in summary, "the unknown operating point"
    settings = page.split("<h2>Settings</h2>", 1)[1]
    shown, folded = settings.split("<details>", 1)
    for given in ("--epochs", "--size", "--lr", "--bs"):  # FIT_ARGS change these from FitConfig's defaults
        assert f"<th>{given[2:]}</th>" in shown, given
    assert "<th>arch</th>" not in shown and "<th>arch</th>" in folded  # the default backbone: folded
    assert "<th>precision</th>" in folded and "reason: " in folded  # the resolved precision record, as text
    assert "{'" not in page and "': " not in page, "a Python dict printed into the page"


def test_losses_plot_draws_each_metric_on_its_own_axis():
    history = pl.DataFrame({"epoch": [0, 1], "phase": ["frozen", "unfrozen"], "train_loss": [1.2, 0.9],
                            "valid_loss": [1.1, 0.9], "accuracy": [0.4, 0.6], "error_rate": [0.6, 0.4],
                            "seconds": [1.0, 1.0], "images": [100, 100], "images_per_s": [40.0, 41.0]})
    axes = losses_figure(history).axes
    curves = [sorted(line.get_label() for line in ax.get_lines()) for ax in axes]
    kept = "kept (epoch 1)"  # the epoch of lowest valid loss, whose weights the run keeps, marked on every axis
    assert curves == [[kept, "train loss", "valid loss"], ["accuracy", kept], ["error rate", kept]]  # no throughput
    assert axes[1].get_ylim()[1] < 1, "accuracy on a 0..1 axis, not squashed by images/s"


def test_per_class_table_agrees_with_the_confusion_matrix(trained_run):
    cm = pl.read_csv(trained_run.run / "confusion_matrix.csv").select(CLASSES).to_numpy()
    table = pl.read_csv(trained_run.run / "per_class.csv")
    assert table["class"].to_list() == CLASSES
    diag = np.diag(cm)
    np.testing.assert_allclose(table["recall"], diag / np.maximum(cm.sum(1), 1))
    np.testing.assert_allclose(table["precision"], diag / np.maximum(cm.sum(0), 1))
    assert table["support"].to_list() == cm.sum(1).tolist()


def test_top_losses_are_validation_files_with_their_labels(trained_run):
    top = pl.read_csv(trained_run.run / "top_losses.csv")
    assert top.height == min(TOP_LOSSES, trained_run.summary["resolved"]["n_valid"])
    assert top["loss"].to_list() == sorted(top["loss"].to_list(), reverse=True)
    page = (trained_run.run / "report.html").read_text()
    for row in top.iter_rows(named=True):
        path = Path(row["name"])
        assert path.is_file() and path.parent.name == row["actual"], row  # class folders: the folder is the label
        assert row["predicted"] in CLASSES
        assert html.escape(path.name) in page
    n_thumbs = sum(1 for s in image_sources(page) if s) - len(PLOTS)
    assert n_thumbs >= top.height - len(trained_run.odd), "top losses need thumbnails"


# ---- write_report on its own: no model, escaping, the tabular hook -------------------------------------------

def fake_run(tmp_path: Path, classes: list[str], n: int = 16, **calibration) -> tuple[Path, dict, pl.DataFrame]:
    run = tmp_path / "run"
    run.mkdir()
    summary = {"config": {"data": "<data>", "arch": "efficientnet_lite0", "epochs": 1},
               "resolved": {"lr": 1e-3, "lr_suggestions": None, "classes": classes, "n_train": 4 * n, "n_valid": n},
               "results": {"valid_accuracy": 0.5, "valid_loss": 1.0, "seconds": 1.0},
               "calibration": {"temperature": 1.5, "valid_ece": {"before": 0.2, "after": 0.1}, "score": "knn",
                               "threshold": -1.0, "keep": 0.95, **calibration}}
    history = pl.DataFrame({"epoch": [0, 1, 2], "phase": ["frozen", "unfrozen", "unfrozen"],
                            "train_loss": [1.2, 0.9, 0.7], "valid_loss": [1.1, 0.95, 0.9], "accuracy": [0.4, 0.5, 0.6],
                            "seconds": [1.0, 1.0, 1.0]})
    return run, summary, history


def validation(n: int, n_classes: int, names: list[str], **kw) -> Validation:
    rng = np.random.default_rng(0)
    return Validation(logits=rng.normal(size=(n, n_classes)), targets=rng.integers(0, n_classes, n), names=names, **kw)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_report_runs_no_model(tmp_path, monkeypatch, task):
    def no_inference(*args, **kwargs):
        raise AssertionError("the report ran a model")
    monkeypatch.setattr(torch.nn.Module, "__call__", no_inference)
    monkeypatch.setattr("pipelines.batches.image_batches", no_inference)
    files = sorted(str(p) for p in (FASHION / "bag").glob("*.png"))[:16]
    run, summary, history = fake_run(tmp_path, CLASSES)
    if task == "regression":
        valid = Validation(targets=np.arange(16.0), predictions=np.arange(16.0) ** 1.1, names=files,
                           rows=pl.DataFrame({"x": range(16)}))
        plots = ["losses.png", "predicted_vs_actual.png"]
    else:
        valid = validation(16, 4, files, images=files, scores=np.linspace(-2, 0, 16))
        plots = [p for p in PLOTS if p != "confusion_matrix.png"]
    out = write_report(run, summary, history, valid)
    assert out == run / "report.html" and out.is_file()
    assert all((run / p).is_file() for p in plots)


def test_report_escapes_every_string(tmp_path):
    nasty_class = "<script>alert(1)</script>"
    classes = [nasty_class, 'quote"class', "amp&class"]
    folder = tmp_path / "files"
    folder.mkdir()
    files = []
    for i in range(6):
        path = folder / f"x{i}<img src=x onerror=alert({i})>&.png"
        shutil.copy(sorted((FASHION / "bag").glob("*.png"))[i], path)
        files.append(str(path))
    run, summary, history = fake_run(tmp_path, classes, n=6, unknown_examples={
        "knn": {"auroc": 0.9, "fpr95": 0.3}, "energy": {"auroc": 0.7, "fpr95": 0.6}})
    (run / "lr_find.png").write_bytes(_png())
    summary["resolved"]["lr_suggestions"] = {"minimum": 1e-3, "steep": 2e-3, "valley": 5e-4, "slide": 3e-3}
    page = write_report(run, summary, history, validation(6, 3, files, images=files)).read_text()
    tags, attrs = parse_tags(page)
    assert "script" not in tags and not any(a.startswith("on") for a in attrs), "a string got into the markup"
    assert html.escape(nasty_class) in page
    assert html.escape(Path(files[0]).name) in page
    assert_self_contained(page)
    assert base64.b64encode((run / "lr_find.png").read_bytes()).decode() in page, "lr_find.png not embedded"
    assert "valley" in page and "AUROC" in page.upper() and "0.9" in page


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 128, 0)).save(buf, "PNG")
    return buf.getvalue()


def parse_tags(page: str) -> tuple[set[str], set[str]]:
    """The element names and attribute names in a page, as a browser's parser sees them."""
    tags, attrs = set(), set()

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attributes):
            tags.add(tag)
            attrs.update(name for name, _ in attributes)

    Parser().feed(page)
    return tags, attrs


def test_report_shows_table_rows_for_tabular_items(tmp_path):
    rows = pl.DataFrame({"bill_length_mm": [39.1 + i for i in range(10)], "island": ["Biscoe", "Dream"] * 5})
    run, summary, history = fake_run(tmp_path, ["Adelie", "Gentoo"], n=10)
    page = write_report(run, summary, history, validation(10, 2, [f"row {i}" for i in range(10)], rows=rows)).read_text()
    top = page.split("losses (validation)</h2>", 1)[1].split("<h2>", 1)[0]
    assert "bill_length_mm" in top and "Biscoe" in top and "<img" not in top


def table_rows(fragment: str) -> list[list[str]]:
    """The text of each table row's cells (th or td) in an HTML fragment, as a browser shows it."""
    rows: list[list[str]] = []

    class Parser(HTMLParser):
        in_cell = False

        def handle_starttag(self, tag, attributes):
            if tag == "tr":
                rows.append([])
            elif tag in ("td", "th"):
                rows[-1].append("")
                self.in_cell = True

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.in_cell = False

        def handle_data(self, data):
            if self.in_cell:
                rows[-1][-1] += data

    Parser().feed(fragment)
    return rows


def test_regression_run_reports_its_largest_errors_with_their_rows(tmp_path):
    """A regression on data/penguins.csv (body mass from the other columns; lr_find, 1 epoch), in this process with
    a backend of its own that fit leaves as it is (plots on matplotlib Figures, no pyplot): the report has settings, lr_find, losses, predicted against actual, and the validation rows with the largest
    errors, each with its columns as they are in the file."""
    import matplotlib
    from pipelines.run import FitConfig, fit
    penguins = REPO / "data" / "penguins.csv"
    run = tmp_path / "run"
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a notebook's or an application's own choice, which fit's plots must leave alone
    try:
        summary = fit(FitConfig(data=str(penguins), target="body_mass_g", epochs=1, out=str(run)),
                      log=lambda *a: None)
        assert matplotlib.get_backend() == "pdf", "fit switched the process's matplotlib backend"
    finally:
        matplotlib.use(before)
    plots = ["lr_find.png", "losses.png", "predicted_vs_actual.png"]
    for name in ["report.html", "top_losses.csv", *plots]:
        assert (run / name).is_file(), f"{name} missing from the run folder"
    page = (run / "report.html").read_text()
    assert_self_contained(page)
    for name in plots:
        assert base64.b64encode((run / name).read_bytes()).decode() in page, f"{name} not embedded"
    assert "regression" in page and "valid rmse" in page and "Confusion matrix" not in page

    top = pl.read_csv(run / "top_losses.csv")
    assert top.columns == ["name", "actual", "predicted", "error"] and top.height == TOP_LOSSES
    np.testing.assert_allclose(top["error"], top["predicted"] - top["actual"])
    assert (top["error"].abs().diff().drop_nulls() <= 0).all(), "largest absolute error first"
    assert abs(top["error"][0]) >= summary["results"]["valid_mae"]
    section = page.split("largest errors (validation)</h2>", 1)[1].split("<h2>", 1)[0]
    header, *cells = table_rows(section)
    shown = [dict(zip(header, row)) for row in cells]
    assert [r["name"] for r in shown] == top["name"].to_list()
    table = pl.read_csv(penguins, null_values="NA")
    assert top["actual"].to_list() == [table["body_mass_g"][int(n.removeprefix("row "))] for n in top["name"]]
    for r in shown:  # each shown row is the file's row of that number: target, prediction and its inputs
        row = table.row(int(r["name"].removeprefix("row ")), named=True)
        assert float(r["actual"]) == float(r["body_mass_g"]) == row["body_mass_g"], r
        assert (r["species"], r["island"], float(r["flipper_length_mm"])) == (
            row["species"], row["island"], row["flipper_length_mm"]), r


def test_item_losses_are_cross_entropy():
    logits = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="none").numpy()
    np.testing.assert_allclose(item_losses(logits.numpy(), targets.numpy()), expected, rtol=1e-5)
