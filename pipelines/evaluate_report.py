"""`itfits evaluate`'s page, DIR/report.html: what the unknown rule catches and keeps first, then the score's
histograms and ROC, the table of thresholds to pick a `--keep` from, the test set's confusion matrix and the worst
items as thumbnails; scores.csv (one row per item) beside it. The page's pieces are reports.py's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from fastcore.xml import H1, H2, H3, Body, Div, Head, Html, Img, Meta, P, Span, Strong, Style, Title, to_xml

from .io import atomic_path, write_table
from .metrics import confusion_matrix
from .plots import plot_roc, plot_score_histograms, write_confusion_matrix
from .reports import _CSS, _figure, _fmt, _frame_table, guarded

WORST = 8  # items shown in each group of the worst items


def write_evaluate_report(out: Path, metrics: dict, *, summary: str, known: pl.DataFrame, unknown: pl.DataFrame | None,
                          classes: list[str], modality, model: str, data: str) -> Path:
    """DIR/report.html of a single-label evaluation, and beside it scores.csv, score_histograms.png, roc.png (with
    unknown examples), confusion_matrix.png/.csv. `known`/`unknown`: one row per item (path, label, predicted,
    confidence, score, correct, accepted). Each plot is `guarded`: one that fails is a note on the page, not a
    failed evaluation. Returns the page's path."""
    out, notes = Path(out), []
    rule = metrics["unknown_rule"]
    score, threshold = rule["score"], rule["threshold"]
    rows = pl.concat([known.with_columns(set=pl.lit("known"))]
                     + ([unknown.with_columns(set=pl.lit("unknown"))] if unknown is not None else []), how="vertical")
    guarded(notes, "scores.csv", write_table, rows.select("set", *known.columns), out / "scores.csv")
    correct = known["correct"].to_numpy()
    known_scores = known["score"].to_numpy()
    groups = {"correct known": known_scores[correct], "wrong known": known_scores[~correct]}
    if unknown is not None:
        groups["unknown"] = unknown["score"].to_numpy()
    guarded(notes, "score_histograms.png", plot_score_histograms, groups, out / "score_histograms.png",
            threshold=threshold, score=score)
    if unknown is not None:
        guarded(notes, "roc.png", plot_roc, known_scores, unknown["score"].to_numpy(), out / "roc.png",
                threshold=threshold, auroc=metrics["scores"][score]["auroc"], score=score)
    targets = np.array([classes.index(c) for c in known["label"]])
    preds = np.array([classes.index(c) for c in known["predicted"]])
    guarded(notes, "confusion_matrix.png", write_confusion_matrix, confusion_matrix(targets, preds, classes), classes,
            out, split="test")

    body = [H1("itfits evaluate"),
            P(Strong(summary)),  # first: what the flag does on these items
            *[P(note, cls="wrong") for note in notes],
            P(f"{model} on {data}: accuracy {metrics['accuracy']:.3f} (balanced {metrics['balanced_accuracy']:.3f}) "
              f"on {metrics['n_known']} {modality.what} ({metrics['n_skipped']} unreadable skipped)"
              + (f"; {metrics['n_unknown']} unknown examples ({metrics['n_unknown_skipped']} unreadable skipped)."
                 if unknown is not None else "; no unknown examples (--unknown DIR).")),
            H2("The unknown score: known against unknown items"),
            _figure(out / "score_histograms.png", "histograms of the unknown score with the threshold"),
            *([_figure(out / "roc.png", "ROC curve of known against unknown items")] if unknown is not None else
              [P("No ROC curve and no unknowns in the histogram: pass examples of none of the classes with "
                 "--unknown DIR to see what the flag catches.", cls="muted")]),
            H2("Choosing --keep"), *_keep_part(metrics, unknown is not None),
            H2("Confusion matrix (test)"), _figure(out / "confusion_matrix.png", "confusion matrix"),
            H2("Per class (test)"),
            _frame_table(pl.DataFrame([{"class": c, **v} for c, v in metrics["per_class"].items()])),
            H2("The worst items"), *_worst_part(known, unknown, modality),
            H2("Calibration"), _figure(out / "reliability.png", "reliability diagram"),
            _figure(out / "risk_coverage.png", "risk-coverage curve"),
            *_scores_part(metrics)]
    page = Html(Head(Meta(charset="utf-8"), Title(f"itfits evaluate: {out.name}"), Style(_CSS)), Body(*body))
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("<!doctype html>\n" + to_xml(page), encoding="utf-8")
    return path


def _keep_part(metrics: dict, with_unknown: bool) -> list:
    """The operating points (evaluate.operating_points) as a table: the bundle's threshold, then each --keep."""
    points, rule = metrics["operating_points"], metrics["unknown_rule"]
    caught = "unknowns caught (rejected)"
    rows = [{"rule": "the bundle's threshold", **points["bundle"]},
            *[{"rule": f"--keep {p['keep']:.2f}", **{k: v for k, v in p.items() if k != "keep"}}
              for p in points["at_keep"]]]
    table = pl.DataFrame([{"rule": r["rule"], "threshold": r["threshold"], "correct known kept": r["correct_kept"],
                           **({caught: r["unknown_rejected"]} if with_unknown else {})} for r in rows])
    return [P(f"Each row is a threshold on {rule['score']}: items scoring below it are flagged unknown. The --keep "
              "rows put the threshold where it keeps that share of the correctly classified items here. To use one: "
              "itfits predict MODEL INPUTS --threshold T, or fit again with --keep K (the fit chooses its threshold "
              "on its own items, so it lands near, not on, these numbers)."),
            _frame_table(table)]


def _worst_part(known: pl.DataFrame, unknown: pl.DataFrame | None, modality) -> list:
    """Three groups of thumbnails: the most confident wrong answers, the known items the flag catches (lowest score
    first), the unknowns it lets through (highest score first)."""
    wrong = known.filter(~pl.col("correct")).sort("confidence", descending=True).head(WORST)
    flagged = known.filter(~pl.col("accepted")).sort("score").head(WORST)
    groups = [("Most confident wrong answers", wrong, "none: every known item was classified right"),
              ("Known items flagged unknown (lowest score first)", flagged, "none")]
    if unknown is not None:
        groups.append(("Unknowns accepted (highest score first)",
                       unknown.filter(pl.col("accepted")).sort("score", descending=True).head(WORST), "none"))
    part = []
    for title, rows, empty in groups:
        part += [H3(title), Div(*[_card(r, modality) for r in rows.iter_rows(named=True)], cls="grid") if rows.height
                 else P(empty, cls="muted")]
    return part


def _card(r: dict, modality) -> Div:
    src = modality.preview(Path(r["path"]))
    name = Path(r["path"]).name
    return Div(Img(src=src, alt=f"thumbnail of {name}") if src else P("(no preview)", cls="muted"),
               Div(name, cls="name", title=r["path"]),
               Div("actual: ", r["label"] or "(unknown example)"),
               Div("predicted: ", Span(r["predicted"], cls="wrong" if r["correct"] is False else None),
                   f" ({r['confidence']:.2f})"),
               Div(f"score {_fmt(r['score'])}", " (flagged)" if not r["accepted"] else ""), cls="card")


def _scores_part(metrics: dict) -> list:
    if "scores" not in metrics:
        return []
    table = pl.DataFrame([{"score": k, **v} for k, v in metrics["scores"].items()])
    return [H2("Every score the bundle can compute"), P("AUROC of known against the unknown examples, and the share "
                                                        "of unknowns accepted at 95% of known items kept (FPR95):"),
            _frame_table(table)]

