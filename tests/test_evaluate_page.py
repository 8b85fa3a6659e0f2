"""`itfits evaluate`'s page (DIR/report.html) on the session's trained model: its plots embedded, the table of
thresholds to pick a --keep from recomputed from the written scores, the "catches" wording; predict's flagged count."""
from __future__ import annotations

import base64
import html
import json
import re
import shutil

import numpy as np
import polars as pl
import pytest

from helpers import FASHION_TEST, REPO, run_here
from pipelines.reports import _fmt

FASHION_UNKNOWN = REPO / "data" / "fashion_unknown"
PNG = b"\x89PNG\r\n\x1a\n"


def _embedded(page: str, alt: str) -> bytes:
    """The PNG bytes of the page's <img> with this alt text."""
    found = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="' + re.escape(alt) + '"', page)
    assert found, f"no embedded PNG with alt {alt!r}"
    return base64.b64decode(found.group(1))


def _table_after(page: str, heading: str) -> list[list[str]]:
    """The cells (text) of the first table after the <h2> `heading`, row by row, the header row first."""
    table = page[page.index(f"<h2>{heading}</h2>"):]
    table = table[table.index("<table>"):table.index("</table>")]
    return [[html.unescape(c).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]


def test_evaluate_page_has_its_plots_and_the_thresholds_to_choose_from(trained_run, tmp_path):
    data = tmp_path / "data"
    for label in ("bag", "sneaker", "trouser", "tshirt"):
        (data / label).mkdir(parents=True)
        for f in sorted((FASHION_TEST / label).glob("*.png"))[:8]:  # half the test set: a cheaper test
            shutil.copy(f, data / label / f.name)
    out = tmp_path / "eval"
    ran = run_here("evaluate", trained_run.model, data, "--unknown", FASHION_UNKNOWN, "--out", out, "--workers", "0")
    assert ran.code == 0, ran.err
    m = json.loads((out / "metrics.json").read_text())
    rule = m["unknown_rule"]
    scores = pl.read_csv(out / "scores.csv")
    known, unknown = scores.filter(pl.col("set") == "known"), scores.filter(pl.col("set") == "unknown")
    assert (known.height, unknown.height) == (m["n_known"], m["n_unknown"]) == (32, 40)
    correct = known.filter(pl.col("correct"))["score"].to_numpy()
    u = unknown["score"].to_numpy()
    assert np.array_equal(unknown["accepted"].to_numpy(), u >= rule["threshold"])

    # the summary says what the flag catches (the unknowns it rejects), in the printed lines and first on the page
    caught = float((u < rule["threshold"]).mean())
    assert rule["unknown_rejected"] == caught == pytest.approx(1 - rule["unknown_accepted"])
    sentence = next(line for line in ran.out.splitlines() if "catches" in line)
    assert f"catches {caught:.1%} of unknowns and keeps {rule['correct_accepted']:.1%} of correct known" in sentence
    assert "accepts" not in ran.out
    page = (out / "report.html").read_text()
    assert page.index("<strong>" + html.escape(sentence) + "</strong>") < page.index("<h2>")

    # the plots, embedded: the same bytes as the files beside the page
    for alt, name in (("histograms of the unknown score with the threshold", "score_histograms.png"),
                      ("ROC curve of known against unknown items", "roc.png"),
                      ("confusion matrix", "confusion_matrix.png"), ("reliability diagram", "reliability.png")):
        data = _embedded(page, alt)
        assert data.startswith(PNG) and data == (out / name).read_bytes()
    cm = pl.read_csv(out / "confusion_matrix.csv")
    assert cm.drop("actual").to_numpy().sum() == 32 and np.trace(cm.drop("actual").to_numpy()) == len(correct)

    # the operating points, recomputed from scores.csv: each --keep's threshold is the highest that keeps that share
    points = m["operating_points"]
    assert [p["keep"] for p in points["at_keep"]] == [0.8, 0.9, 0.95, 0.99]  # the bundle's keep 0.95 among them
    for p in [points["bundle"], *points["at_keep"]]:
        assert p["correct_kept"] == float((correct >= p["threshold"]).mean())
        assert p["unknown_rejected"] == float((u < p["threshold"]).mean())
    for p in points["at_keep"]:
        assert (correct >= p["threshold"]).mean() >= p["keep"] > (correct > p["threshold"]).mean()
    assert points["bundle"]["threshold"] == rule["threshold"]
    assert points["bundle"]["correct_kept"] == rule["correct_accepted"]
    rows = _table_after(page, "Choosing --keep")
    assert rows[0] == ["rule", "threshold", "correct known kept", "unknowns caught (rejected)"]
    assert rows[1:] == [[name, _fmt(p["threshold"]), _fmt(p["correct_kept"]), _fmt(p["unknown_rejected"])]
                        for name, p in [("the bundle's threshold", points["bundle"]),
                                        *[(f"--keep {p['keep']:.2f}", p) for p in points["at_keep"]]]]

    # the worst items: thumbnails of the unknowns the flag let through, highest score first
    accepted = unknown.filter(pl.col("accepted")).sort("score", descending=True)
    group = page[page.index("<h3>Unknowns accepted"):]
    names = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="thumbnail of ([^"]+)"', group)
    assert names == [p.rsplit("/", 1)[-1] for p in accepted["path"].head(8)]


def test_evaluate_page_without_unknown_examples_says_so(trained_run, tmp_path):
    data = tmp_path / "data"
    for label in ("bag", "sneaker", "trouser"):
        (data / label).mkdir(parents=True)
        for f in sorted((FASHION_TEST / label).glob("*.png"))[:4]:
            shutil.copy(f, data / label / f.name)
    out = tmp_path / "eval"
    ran = run_here("evaluate", trained_run.model, data, "--out", out, "--workers", "0")
    assert ran.code == 0, ran.err
    assert "how many unknowns it catches needs examples: --unknown DIR" in ran.out
    page = (out / "report.html").read_text()
    assert _embedded(page, "histograms of the unknown score with the threshold").startswith(PNG)
    assert _embedded(page, "confusion matrix").startswith(PNG)
    assert "No ROC curve" in page and not (out / "roc.png").exists()
    assert _table_after(page, "Choosing --keep")[0] == ["rule", "threshold", "correct known kept"]
    assert pl.read_csv(out / "scores.csv")["set"].unique().to_list() == ["known"]


def test_predict_prints_how_many_rows_it_flagged(trained_run, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(FASHION_UNKNOWN / "sandal", inputs)
    for f in sorted((FASHION_TEST / "bag").glob("*.png"))[:10]:
        shutil.copy(f, inputs / f.name)
    (inputs / "empty.png").write_bytes(b"")  # a row with an error: not counted among the predicted
    out = tmp_path / "preds.csv"
    ran = run_here("predict", trained_run.model, inputs, "--out", out, "--workers", "0")
    assert ran.code == 0, ran.err
    table = pl.read_csv(out)
    flagged, predicted = int(table["unknown"].fill_null(False).sum()), int(table["error"].is_null().sum())
    assert predicted == table.height - 1 == len(list(FASHION_UNKNOWN.glob("sandal/*.png"))) + 10
    assert f"flagged {flagged} of {predicted} files unknown ({flagged / predicted:.1%})" in ran.out + ran.err
