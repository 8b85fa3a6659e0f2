"""RUN/report.html: one self-contained page of a run's results, figures (plots.py) and settings, and the tables
(CSV) beside it."""
from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from fastcore.xml import (H1, H2, H3, Body, Details, Div, Head, Html, Img, Li, Meta, P, Span, Style, Summary, Table,
                          Td, Th, Title, Tr, Ul, to_xml)

from .errors import ItfitsWarning
from .images import load_image
from .io import atomic_path, write_table
from .metrics import (balanced_accuracy, confusion_matrix, item_losses, multilabel_metrics, per_class, sigmoid,
                      softmax)
from .plots import plot_losses, plot_predicted_vs_actual, plot_reliability, plot_risk_coverage, write_confusion_matrix
from .unknown import unknown_estimate_line


def guarded(notes: list[str], what: str, write, *args, **kwargs):
    """write(*args, **kwargs), or None with a note (in `notes`, and a warning on stderr) when it fails: a plot or
    table after training (out of memory, a matplotlib error) never costs a run its bundle or its exit status."""
    try:
        return write(*args, **kwargs)
    except Exception as e:  # MemoryError included
        note = f"{what} was skipped: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        notes.append(note)
        warnings.warn(note, ItfitsWarning)
        return None


# ---- the run report: one self-contained HTML file ---------------------------------------------------------

TOP_LOSSES = 12  # items shown in the report's top-losses section
THUMBNAIL = 96  # pixels, the longer side of a top-loss thumbnail


@dataclass(frozen=True)
class Validation:
    """What training already computed on the validation set; the report draws on it and runs no model.
    A classifier's has `logits`, a regression's `predictions`."""
    targets: np.ndarray  # (N,) class indices; regression: true values in the target's units
    names: list[str]  # how a person finds each item: its file, or a row id
    logits: np.ndarray | None = None  # (N, C) uncalibrated, as the loss saw them
    predictions: np.ndarray | None = None  # (N,) regression: predicted values in the target's units
    probs: np.ndarray | None = None  # (N, C) calibrated probabilities; None: softmax of the logits
    scores: np.ndarray | None = None  # (N,) unknown score of each item (higher = known); None: no risk-coverage plot
    images: list[str] | None = None  # a picture of each item (image file, spectrogram PNG) for the thumbnails
    rows: pl.DataFrame | None = None  # tabular: each item's input columns, shown instead of thumbnails
    thresholds: np.ndarray | None = None  # multi-label: (C,) per-class thresholds; targets are then (N, C) 0/1

    def __post_init__(self):
        if (self.logits is None) == (self.predictions is None):
            raise ValueError("Validation takes logits (classification) or predictions (regression), one of them")

    @property
    def regression(self) -> bool:
        return self.predictions is not None

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None


def top_losses(valid: Validation, classes: list[str], k: int = TOP_LOSSES) -> pl.DataFrame:
    """The k validation items with the highest loss: index, name, actual, predicted, then probability and loss;
    regression: the largest absolute errors, then error (predicted - actual)."""
    if valid.multi_label:  # each item's binary cross-entropy, summed over the classes
        probs = np.clip(valid.probs if valid.probs is not None else sigmoid(valid.logits), 1e-12, 1 - 1e-12)
        losses = -(valid.targets * np.log(probs) + (1 - valid.targets) * np.log(1 - probs)).sum(1)
        order = np.argsort(-losses, kind="stable")[:k]
        names = lambda row: ";".join(c for c, on in zip(classes, row) if on) or "(none)"  # noqa: E731
        above = probs >= valid.thresholds
        columns = {"actual": [names(valid.targets[i] > 0.5) for i in order],
                   "predicted": [names(above[i]) for i in order],
                   "probability": probs[order].max(1).astype(float), "loss": losses[order].astype(float)}
    elif valid.regression:
        error = valid.predictions - valid.targets
        order = np.argsort(-np.abs(error), kind="stable")[:k]
        columns = {"actual": valid.targets[order].astype(float), "predicted": valid.predictions[order].astype(float),
                   "error": error[order].astype(float)}
    else:
        losses = item_losses(valid.logits, valid.targets)
        probs = valid.probs if valid.probs is not None else softmax(valid.logits)
        order = np.argsort(-losses, kind="stable")[:k]
        preds = probs.argmax(1)
        columns = {"actual": [classes[valid.targets[i]] for i in order],
                   "predicted": [classes[preds[i]] for i in order],
                   "probability": probs[order, preds[order]].astype(float), "loss": losses[order].astype(float)}
    return pl.DataFrame({"index": order, "name": [valid.names[i] for i in order], **columns},
                        schema_overrides={"index": pl.Int64})


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail_uri(path: str | Path, size: int = THUMBNAIL) -> str | None:
    """A small PNG of an image file as a data URI (RGBA, 16-bit, EXIF handled as in training); None if unreadable."""
    try:
        img = load_image(str(path))
    except Exception:  # the report says "no preview"; the file's own problem was reported by training
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return png_data_uri(buf.getvalue())


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}img.plot{max-width:100%}.muted{color:#777}
.grid{display:flex;flex-wrap:wrap;gap:.8em 2em}h3{margin:.3em 0}
.card{border:1px solid #ddd;padding:.4em;width:11em;font-size:.85em}
.card img{display:block;margin:0 auto .3em;image-rendering:pixelated;width:96px;height:96px;object-fit:contain}
/* contain: a spectrogram thumbnail is tall and narrow; it keeps its shape in the square */
.wrong{color:#b00}
.name{word-break:break-all}"""


def _fmt(v) -> str:
    """A value as a person reads it: numbers to 4 significant digits, records (dicts) as `key: value` text, lists
    joined by commas, None as a dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, ".4g")
    if isinstance(v, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {_fmt(x)}" for k, x in v.items()) or "—"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_fmt, v)) or "—"
    return str(v)


def _kv_table(d: dict):
    return Table(*[Tr(Th(k), Td(_fmt(v))) for k, v in d.items()])


def _frame_table(df: pl.DataFrame):
    numeric = [dtype.is_numeric() for dtype in df.dtypes]
    return Table(Tr(*[Th(c) for c in df.columns]),
                 *[Tr(*[Td(_fmt(v), cls="num" if num else None) for v, num in zip(row, numeric)])
                   for row in df.iter_rows()])


def _figure(path: Path, alt: str):
    if not path.is_file():
        return P(f"({path.name} was not written)", cls="muted")
    return Img(src=png_data_uri(path.read_bytes()), alt=alt, cls="plot")


def _folded(title: str, *content):
    return Details(Summary(title), *content)


def write_report(run: Path, summary: dict, history: pl.DataFrame, valid: Validation, *,
                 notes: list[str] | None = None, defaults: dict | None = None) -> Path:
    """RUN/report.html, results first: the summary and what to look at (accuracy, the most confused classes, the
    worst item, the unknown operating point); then for a classifier the confusion matrix, per-class
    precision/recall, top losses, calibration and unknown figures, for a regression predicted against actual and the
    rows with the largest errors; then loss curves, lr_find and skipped files; the settings last: those that differ
    from `defaults` (FitConfig's, as a dict) shown, the rest and the resolved values folded (<details>). Writes
    losses.png, top_losses.csv and (classifier) confusion_matrix.png/.csv, reliability.png, risk_coverage.png,
    per_class.csv or (regression) predicted_vs_actual.png beside it. Every image is embedded, so the one file can be
    mailed. Draws only on what training computed (history, validation outputs): it runs no model. Each plot and
    table is `guarded`: one that fails is left out, with a note in the page and on stderr; `notes` (more such
    notes) are shown too. Returns the path."""

    run = Path(run)
    notes = list(notes or [])
    config, resolved, results = summary["config"], summary["resolved"], summary.get("results", {})
    guarded(notes, "losses.png", plot_losses, history, run / "losses.png")
    top = top_losses(valid, resolved["classes"])
    guarded(notes, "top_losses.csv", write_table, top.drop("index"), run / "top_losses.csv")
    model = resolved.get("model", config.get("arch", ""))  # what the modality calls it (runs before it: the arch)
    task = ("regression" if valid.regression else
            f"{len(resolved['classes'])} classes ({', '.join(resolved['classes'])})"
            + (", multi-label" if valid.multi_label else ""))
    look, part = (_regression_part(run, config.get("target", ""), valid, top, notes) if valid.regression else
                  _multilabel_part(run, summary, valid, top, notes) if valid.multi_label else
                  _classification_part(run, summary, valid, top, notes))
    skipped_part, n_skipped = _skipped_part(run)
    check_part, check_look = _check_part(run, summary.get("check"))
    look += check_look
    if n_skipped:
        look.append(f"{n_skipped} input files were skipped (unreadable or empty): the list is below")
    body = [H1("itfits run report"),
            *[P(note, cls="wrong") for note in notes],  # at the top: a reader must see what is missing
            P(f"{model} on {config.get('data', '')}: {task}, {resolved.get('n_train')} train / "
              f"{resolved.get('n_valid')} valid items."),
            H2("Summary"), _kv_table({k.replace("_", " "): v for k, v in results.items()
                                      if k not in ("valid_per_class", "models")}),  # multi-label: the per-class
            # table shows it; tables trained by several learners: the table below
            *_models_part(results.get("models"), resolved),
            P("What to look at:"), Ul(*[Li(line) for line in look]),
            *part,
            H2("Loss and metrics"), _figure(run / "losses.png", "loss and metric curves"),
            H2("Learning rate finder"), *_lr_part(run, resolved),
            *skipped_part, *check_part,
            H2("Settings"), *_settings_part(config, resolved, defaults)]
    page = Html(Head(Meta(charset="utf-8"), Title(f"itfits report: {run.name}"), Style(_CSS)), Body(*body))
    out = run / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text("<!doctype html>\n" + to_xml(page), encoding="utf-8")
    return out


def _models_part(models: dict | None, resolved: dict) -> list:
    """A table trained by several learners (--model auto): each one's validation figures, the kept one first."""
    if not models:
        return []
    kept = resolved.get("learner")
    rows = [{"model": k + (" (kept)" if k == kept else ""), **v} for k, v in sorted(models.items(), key=lambda kv:
                                                                                     kv[0] != kept)]
    return [P(f"Models trained on the same split ({resolved.get('learner_why', '')}):"),
            _frame_table(pl.DataFrame(rows))]


def _lr_part(run: Path, resolved: dict) -> list:
    # a table's run: the learner that searched (the network), kept or not
    resolved = next((r for r in resolved.get("learners", {}).values() if r.get("lr_suggestions")), resolved)
    if not resolved.get("lr_suggestions"):
        return [P("lr_find did not run: " + (f"the learning rate was given ({resolved['lr']})." if resolved.get("lr")
                                             else "the model takes no learning-rate search."), cls="muted")]
    return [_figure(run / "lr_find.png", "lr_find plot"),
            _kv_table({f"suggestion: {k}": v for k, v in resolved["lr_suggestions"].items()})]


def _skipped_part(run: Path) -> tuple[list, int]:
    skipped = run / "skipped.csv"
    table = pl.read_csv(skipped, infer_schema_length=0) if skipped.is_file() else pl.DataFrame()
    if not table.height:
        return [], 0
    return [H2(f"Skipped files ({table.height})"), _frame_table(table.head(200)),
            P("(first 200; all in skipped.csv)", cls="muted") if table.height > 200 else ""], table.height


CHECK_ROWS = 50  # findings shown in the report; all are in check.csv


def _check_part(run: Path, check: dict | None) -> tuple[list, list[str]]:
    """(sections, lines of what to look at) of the data check (check.py): findings per kind, class counts, the
    first CHECK_ROWS rows of check.csv."""
    if not check:
        return [], []
    found = {k: n for k, n in check["findings"].items() if n}
    serious = {k: found[k] for k in ("leakage", "label_conflict", "mislabelled") if k in found}
    look = ([f"data check: {', '.join(f'{n} {k}' for k, n in serious.items())}; "
             "the files are listed under Data check"] if serious else [])
    csv = run / "check.csv"
    table = pl.read_csv(csv, infer_schema_length=0) if csv.is_file() else pl.DataFrame()
    part = [H2(f"Data check ({sum(found.values())} findings)"),
            _kv_table({"findings": found or "none", "class counts": check["class_counts"],
                       "imbalance (largest / smallest class)": check.get("imbalance"),
                       "seconds": check.get("seconds")}),
            *[P(note, cls="muted") for note in check.get("notes", [])]]
    if table.height:
        part += [_frame_table(table.head(CHECK_ROWS).with_columns(
                     pl.col("path", "other_path").str.split("/").list.last())),
                 P(f"(first {CHECK_ROWS}; all, with full paths, in check.csv)", cls="muted")
                 if table.height > CHECK_ROWS else ""]
    return part, look


def _settings_part(config: dict, resolved: dict, defaults: dict | None) -> list:
    """The settings given that differ from `defaults`, shown; the ones at their defaults and the values the run
    resolved (lr, batch size, precision, ...), folded."""
    defaults = defaults or {}
    changed = {k: v for k, v in config.items() if k not in defaults or v != defaults[k]}
    same = {k: v for k, v in config.items() if k not in changed}
    used = {k: v for k, v in resolved.items() if k not in ("classes", "lr_suggestions")}
    return [H3("Changed from the defaults (FitConfig)"),
            _kv_table(changed) if changed else P("none", cls="muted"),
            *([_folded(f"At their defaults ({len(same)})", _kv_table(same))] if same else []),
            _folded(f"As used: what the run resolved ({len(used)})", _kv_table(used))]


def _classification_part(run: Path, summary: dict, valid: Validation, top: pl.DataFrame,
                         notes: list[str]) -> tuple[list[str], list]:
    """(lines of what to look at, sections): confusion matrix (confusion_matrix.png/.csv), per-class table
    (per_class.csv), top losses, calibration and unknown figures."""
    classes, calib = summary["resolved"]["classes"], summary.get("calibration") or {}
    probs = valid.probs if valid.probs is not None else softmax(valid.logits)
    preds = probs.argmax(1)
    cm = confusion_matrix(valid.targets, preds, classes)
    guarded(notes, "confusion_matrix.png", write_confusion_matrix, cm, classes, run)
    guarded(notes, "reliability.png", plot_reliability, probs, valid.targets, run / "reliability.png")
    if valid.scores is not None:
        guarded(notes, "risk_coverage.png", plot_risk_coverage, valid.scores, preds == valid.targets,
                run / "risk_coverage.png", threshold=calib.get("threshold"))
    pc_table = pl.DataFrame([{"class": c, **m} for c, m in per_class(valid.targets, preds, classes).items()])
    guarded(notes, "per_class.csv", write_table, pc_table, run / "per_class.csv")
    recalls = pc_table.sort("recall").row(0, named=True)
    look = [f"accuracy {float((preds == valid.targets).mean()):.3f}, balanced accuracy (mean recall per class) "
            f"{balanced_accuracy(valid.targets, preds):.3f} on {len(preds)} validation items; lowest recall: "
            f"{recalls['class']} {recalls['recall']:.2f} (the per-class table below)"]
    balance = summary["resolved"].get("balance")
    if balance:
        look.append(f"class balance: {balance['method']} ({balance['reason']})")
    off = cm - np.diag(np.diag(cm))
    if off.any():
        i, j = np.unravel_index(np.argmax(off), off.shape)
        look.append(f"most confused: {classes[i]} predicted as {classes[j]} ({off[i, j]} of {cm[i].sum()} "
                    f"{classes[i]} items); the confusion matrix below")
    look += _worst_and_operating_point(top, calib, "the correct validation items")
    return look, [H2("Confusion matrix (validation)"), _figure(run / "confusion_matrix.png", "confusion matrix"),
                  H2("Per class (validation)"), _frame_table(pc_table),
                  H2(f"Top {top.height} losses (validation)"), _top_losses_part(top, valid),
                  H2("Calibration and unknowns"), *_calibration_part(run, calib, risk=valid.scores is not None)]


def _worst_and_operating_point(top: pl.DataFrame, calib: dict, accepted: str) -> list[str]:
    """The summary's lines on the worst validation item and on the unknown threshold (what share of `accepted` it
    accepts, and of the --unknown examples where there were some)."""
    look = []
    if top.height:
        w = top.row(0, named=True)
        look.append(f"worst item: {Path(w['name']).name}, {w['actual']} predicted {w['predicted']} "
                    f"(loss {w['loss']:.3f}); the top losses below")
    if calib:
        look.append(f"unknown operating point: {calib.get('score')} >= {_fmt(calib.get('threshold'))} accepts "
                    + _share(calib.get("valid_correct_accepted")) + f" of {accepted}"
                    + (f" and {_share(calib['unknown_examples_accepted'])} of the --unknown examples"
                       if "unknown_examples_accepted" in calib else ""))
        if unknown_estimate_line(calib):
            look.append(unknown_estimate_line(calib))
    return look


def _multilabel_part(run: Path, summary: dict, valid: Validation, top: pl.DataFrame,
                     notes: list[str]) -> tuple[list[str], list]:
    """(lines of what to look at, sections) of a multi-label run: per-class precision/recall/F1/AP at the chosen
    thresholds (per_class.csv), macro/micro F1 and mAP, top losses, calibration and unknown figures."""
    classes, calib = summary["resolved"]["classes"], summary.get("calibration") or {}
    probs = valid.probs if valid.probs is not None else sigmoid(valid.logits)
    m = multilabel_metrics(valid.targets, probs >= valid.thresholds, probs, classes)
    pc_table = pl.DataFrame([{"class": c, "threshold": float(t), **v}
                             for (c, v), t in zip(m["per_class"].items(), valid.thresholds)])
    guarded(notes, "per_class.csv", write_table, pc_table, run / "per_class.csv")
    if valid.scores is not None:  # "correct" here: every class of the item decided right
        guarded(notes, "risk_coverage.png", plot_risk_coverage, valid.scores,
                ((probs >= valid.thresholds) == (valid.targets > 0.5)).all(1), run / "risk_coverage.png",
                threshold=calib.get("threshold"))
    worst = pc_table.sort("f1").row(0, named=True)
    look = [f"macro F1 {m['macro_f1']:.3f}, micro F1 {m['micro_f1']:.3f}, mAP {_fmt(m['map'])}, every class right on "
            f"{m['subset_accuracy']:.1%} of {len(probs)} validation items; lowest F1: {worst['class']} "
            f"{worst['f1']:.2f} (the per-class table below)",
            f"{float((probs < valid.thresholds).all(1).mean()):.1%} of the validation items have no class above its "
            "threshold: predicted unknown (none of the classes)"]
    look += _worst_and_operating_point(top, calib, "the validation items")
    return look, [H2("Per class (validation, at each class's threshold)"), _frame_table(pc_table),
                  _kv_table({"macro F1": m["macro_f1"], "micro F1": m["micro_f1"], "mAP": m["map"],
                             "subset accuracy": m["subset_accuracy"], "label accuracy": m["label_accuracy"]}),
                  H2(f"Top {top.height} losses (validation)"), _top_losses_part(top, valid),
                  H2("Calibration and unknowns"), *_calibration_part(run, calib, risk=valid.scores is not None,
                                                                      reliability=False)]


def _share(v) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else _fmt(v)


def _regression_part(run: Path, target: str, valid: Validation, top: pl.DataFrame,
                     notes: list[str]) -> tuple[list[str], list]:
    """(lines of what to look at, sections): predicted against actual (predicted_vs_actual.png) and the rows with
    the largest errors."""
    guarded(notes, "predicted_vs_actual.png", plot_predicted_vs_actual, valid.targets, valid.predictions,
            run / "predicted_vs_actual.png", target=target)
    error = valid.predictions - valid.targets
    look = [f"mean absolute error {_fmt(float(np.abs(error).mean()))} on {len(error)} validation rows"]
    if top.height:
        look.append(f"largest error: {top['name'][0]}, {_fmt(top['error'][0])} ({_fmt(top['predicted'][0])} "
                    f"predicted, {_fmt(top['actual'][0])} actual); the rows below")
    return look, [H2("Predicted against actual (validation)"),
                  _figure(run / "predicted_vs_actual.png", "predicted against actual"),
                  H2(f"The {top.height} largest errors (validation)"), _top_losses_part(top, valid)]


def _top_losses_part(top: pl.DataFrame, valid: Validation):
    if valid.rows is not None:  # tabular: the items' input columns, beside actual/predicted/loss
        inputs = valid.rows[top["index"].to_list()]
        return _frame_table(pl.concat([top.drop("index"), inputs], how="horizontal"))
    cards = []
    for r in top.iter_rows(named=True):
        src = thumbnail_uri(valid.images[r["index"]]) if valid.images is not None else None
        name = Path(r["name"]).name
        cards.append(Div(Img(src=src, alt=f"thumbnail of {name}") if src else P("(no preview)", cls="muted"),
                         Div(name, cls="name", title=r["name"]),
                         Div("actual: ", r["actual"]),
                         Div("predicted: ", Span(r["predicted"], cls=None if r["predicted"] == r["actual"] else "wrong"),
                             f" ({r['probability']:.2f})"),
                         Div(f"loss {r['loss']:.3f}"), cls="card"))
    return Div(*cards, cls="grid")


def _calibration_part(run: Path, calib: dict, *, risk: bool, reliability: bool = True) -> list:
    if not calib:
        return [P("No calibration in this run.", cls="muted")]
    estimate = unknown_estimate_line(calib)
    part = [*([P(estimate[0].upper() + estimate[1:] + ". Estimated at fit time without unknown examples: each known "
                 "class in turn was scored as unknown against the others, at the threshold chosen as the shipped one is.")]
              if estimate else []),
            *([P(f"Temperature {calib['temperature_note']}.")] if calib.get("temperature_note") else []),
            _kv_table({"temperature": calib.get("temperature"),
                       "valid ECE before → after": _before_after(calib.get("valid_ece")),
                       "valid NLL before → after": _before_after(calib.get("valid_nll")),
                       "unknown score": calib.get("score"), "chosen by": calib.get("score_chosen_by"),
                       "threshold": calib.get("threshold"), "keep": calib.get("keep"),
                       "threshold chosen on": calib.get("threshold_chosen_on"),
                       "correct valid items accepted": calib.get("valid_correct_accepted"),
                       **({"unknown examples accepted": calib["unknown_examples_accepted"]}
                          if "unknown_examples_accepted" in calib else {})}),
            *([_figure(run / "reliability.png", "reliability diagram")] if reliability else [])]
    if risk:  # not an older run's file left in RUN
        part.append(_figure(run / "risk_coverage.png", "risk-coverage curve"))
    if calib.get("unknown_examples"):
        table = pl.DataFrame([{"score": k, **v} for k, v in calib["unknown_examples"].items()])
        part += [P("Known (validation) against the --unknown examples, per score:"), _frame_table(table)]
    return part


def _before_after(d: dict | None) -> str | None:
    return None if not d else f"{d['before']:.4f} → {d['after']:.4f}"
