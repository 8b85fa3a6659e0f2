"""`itfits evaluate`: how well a bundle classifies labelled data and catches unknowns, with plots and metrics.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .batches import file_outputs
from .bundle import load_bundle
from .errors import ItfitsError
from .evaluate_report import write_evaluate_report
from .images import ImagePreprocessing
from .io import write_json
from .multilabel import evaluate_multilabel
from .metrics import (accepted_at_rate, auroc, balanced_accuracy, expected_calibration_error, fpr_at_tpr, nll, per_class,
                      softmax, threshold_for_share)
from .plots import plot_reliability, plot_risk_coverage
from .sources import expand_inputs, read_source, text_path
from .unknown import compute_scores

PLAIN_RULE = 0.95  # what most fastai users write by hand: max softmax < 0.95 -> unknown
KEEPS = (0.80, 0.90, 0.95, 0.99)  # the --keep values the page's table shows, with the bundle's own


def evaluate(model: str | Path, data: str | Path, *, out: str | Path, unknown: str | Path | None = None,
             num_workers: int | None = None, tta: bool = False) -> dict:
    """Metrics of a bundle on labelled DATA (every file, whatever its split) and optional unknown examples, written to
    OUT/metrics.json, with OUT/report.html (evaluate_report) and its plots for a single-label model; `tta`: each
    image's outputs averaged with its mirror image's (predict.image_batches). Returns the metrics."""
    bundle = load_bundle(model)
    modality = bundle.modality
    if not modality.row_per_file:  # evaluate runs labelled files through batches.file_outputs
        raise ItfitsError(f"{model} is a {modality.name} model; itfits evaluate takes models of labelled files for now. "
                          "Its validation figures are in the run's run.json; for new inputs, itfits predict MODEL "
                          "INPUT --out FILE")
    classes, calib = bundle.classes, bundle.calibration
    items = modality.check_files(read_source(data, exts=modality.exts, multi_label=bundle.multi_label))
    n_files = items.height
    items = items.filter(pl.col("error").is_null())
    given = set(items["labels"].explode().drop_nulls()) if bundle.multi_label else set(items["label"])
    foreign = sorted(given - set(classes))
    if foreign:
        raise ItfitsError(f"classes in {data} that the model does not know: {', '.join(foreign)}; "
                          f"pass examples of none of its classes with --unknown DIR instead")
    if items.height == 0:
        raise ItfitsError(f"no usable files in {data}")
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    if unknown is not None:  # before the known files, so a folder with nothing usable fails at once
        u_paths = [p for p, err in expand_inputs([str(unknown)], modality.exts) if err is None]
        if not u_paths:
            raise ItfitsError(f"--unknown {unknown}: no {modality.what} found")
        u_logits, u_feats, u_errors = file_outputs(bundle.scoring_model, prep, u_paths, modality=modality,
                                                   options=bundle.options, num_workers=num_workers, tta=tta)
        u_good = np.array([not e for e in u_errors])
        unreadable = [(text_path(p), e) for p, e in zip(u_paths, u_errors) if e]
        if not u_good.any():
            path, error = unreadable[0]
            raise ItfitsError(f"--unknown {unknown}: none of its {len(unreadable)} {modality.what} could be read; "
                              f"the first, {path}: {error}")
        u_paths = [text_path(p) for p, ok in zip(u_paths, u_good) if ok]
        u_logits, u_feats = u_logits[u_good], u_feats[u_good]
    logits, feats, errors = file_outputs(bundle.scoring_model, prep, items["path"].to_list(), modality=modality,
                                         options=bundle.options, num_workers=num_workers, tta=tta)
    good = np.array([not e for e in errors])
    if not good.any():
        raise ItfitsError(f"none of the files in {data} could be read; the first: {errors[0]}")
    items, logits, feats = items.filter(pl.Series(good)), logits[good], feats[good]
    if bundle.multi_label:  # several classes per file, or none: F1 and mAP instead of accuracy
        metrics = {"tta": tta, **evaluate_multilabel(calib, classes, items["labels"].to_list(), logits, feats,
                                                     unknown=(u_logits, u_feats) if unknown is not None else None),
                   "n_skipped": n_files - items.height}
        write_json(metrics, Path(out) / "metrics.json")
        return metrics
    targets = np.array([classes.index(c) for c in items["label"]])
    probs = softmax(logits, calib.temperature)
    preds = probs.argmax(1)
    correct = preds == targets
    scores = compute_scores(logits, feats, temperature=calib.temperature, stats=calib.stats, names=calib.scores)
    accepted = scores[calib.score] >= calib.threshold
    plain_accepted = softmax(logits).max(1) >= PLAIN_RULE
    metrics = {
        "tta": tta,
        "n_known": int(len(targets)),
        "n_skipped": n_files - int(len(targets)),  # files of DATA that could not be read
        "accuracy": float(correct.mean()),
        "balanced_accuracy": balanced_accuracy(targets, preds),
        "per_class": per_class(targets, preds, classes),
        "nll": {"uncalibrated": nll(logits, targets), "calibrated": nll(logits, targets, calib.temperature)},
        "ece": {"uncalibrated": expected_calibration_error(softmax(logits), targets),
                "calibrated": expected_calibration_error(probs, targets)},
        "unknown_rule": {"score": calib.score, "threshold": calib.threshold, "coverage": float(accepted.mean()),
                         "accuracy_on_accepted": float(correct[accepted].mean()) if accepted.any() else None,
                         "correct_accepted": float(accepted[correct].mean()) if correct.any() else None},
        "plain_rule": {"rule": f"max softmax >= {PLAIN_RULE}", "coverage": float(plain_accepted.mean()),
                       "accuracy_on_accepted": float(correct[plain_accepted].mean()) if plain_accepted.any() else None,
                       "correct_accepted": float(plain_accepted[correct].mean()) if correct.any() else None},
    }
    if unknown is not None:
        u_scores = compute_scores(u_logits, u_feats, temperature=calib.temperature, stats=calib.stats,
                                  names=calib.scores)
        metrics["n_unknown"], metrics["n_unknown_skipped"] = len(u_logits), len(unreadable)
        metrics["scores"] = {n: {"auroc": auroc(scores[n], u_scores[n]), "fpr95": fpr_at_tpr(scores[n], u_scores[n])}
                             for n in calib.scores}
        metrics["unknown_rule"]["unknown_accepted"] = float((u_scores[calib.score] >= calib.threshold).mean())
        metrics["unknown_rule"]["unknown_rejected"] = float((u_scores[calib.score] < calib.threshold).mean())
        u_plain = softmax(u_logits).max(1)
        plain_rate = float((u_plain >= PLAIN_RULE).mean())
        metrics["plain_rule"]["unknown_accepted"] = plain_rate
        metrics["plain_rule"]["unknown_rejected"] = float((u_plain < PLAIN_RULE).mean())
        for n in calib.scores:  # the fair comparison: accept no more unknowns than the plain rule does
            metrics["scores"][n]["correct_accepted_at_plain_unknown_rate"] = accepted_at_rate(
                scores[n][correct], u_scores[n], plain_rate)
    u_score = u_scores[calib.score] if unknown is not None else None
    metrics["operating_points"] = operating_points(scores[calib.score][correct], u_score, threshold=calib.threshold,
                                                   keeps=sorted({*KEEPS, calib.keep}))
    out = Path(out)
    plot_reliability(probs, targets, out / "reliability.png")
    plot_risk_coverage(scores[calib.score], correct, out / "risk_coverage.png", threshold=calib.threshold)
    write_json(metrics, out / "metrics.json")
    known = items.select("path", "label").with_columns(
        predicted=pl.Series([classes[i] for i in preds], dtype=pl.String),
        confidence=probs.max(1).astype(np.float64), score=scores[calib.score].astype(np.float64),
        correct=correct, accepted=accepted)
    unknowns = None if unknown is None else pl.DataFrame({
        "path": u_paths, "label": pl.Series([None] * len(u_paths), dtype=pl.String),
        "predicted": [classes[i] for i in u_logits.argmax(1)],
        "confidence": softmax(u_logits, calib.temperature).max(1).astype(np.float64),
        "score": u_score.astype(np.float64), "correct": pl.Series([None] * len(u_paths), dtype=pl.Boolean),
        "accepted": u_score >= calib.threshold})
    write_evaluate_report(out, metrics, summary=summary_line(metrics), known=known, unknown=unknowns,
                          classes=classes, modality=modality, model=str(model), data=str(data))
    return metrics


def operating_points(correct: np.ndarray, unknown: np.ndarray | None, *, threshold: float,
                     keeps: list[float]) -> dict:
    """The unknown rule at the bundle's threshold and at each `--keep` in `keeps`, on these items: the threshold
    that keeps that share of the correct known items (scores `correct`), the share it keeps and (with `unknown`
    scores) the share of unknowns it rejects. A user picks one: `itfits fit --keep K`, or `predict --threshold T`."""
    def point(t: float) -> dict:
        return {"threshold": t, "correct_kept": float((correct >= t).mean()) if len(correct) else None,
                "unknown_rejected": None if unknown is None else float((unknown < t).mean())}
    return {"bundle": point(float(threshold)),
            "at_keep": [{"keep": k, **point(threshold_for_share(correct, k))} for k in keeps] if len(correct) else []}


def summary_line(m: dict) -> str:
    """The unknown rule in one sentence: how many unknowns it catches (rejects) and how many correct known items it
    keeps, beside the plain 0.95 rule; the CLI prints it and the page shows it first."""
    rule, plain = m["unknown_rule"], m["plain_rule"]
    share = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731 (no correct item: nothing to keep)
    head = f"{rule['score']} >= {rule['threshold']:.4g}: "
    if "unknown_rejected" in rule:
        return (head + f"catches {rule['unknown_rejected']:.1%} of unknowns and keeps {share(rule['correct_accepted'])}"
                f" of correct known items (plain {PLAIN_RULE} rule: catches {plain['unknown_rejected']:.1%}, keeps "
                f"{share(plain['correct_accepted'])})")
    return (head + f"keeps {share(rule['correct_accepted'])} of correct known items (plain {PLAIN_RULE} rule: "
            f"{share(plain['correct_accepted'])}); how many unknowns it catches needs examples: --unknown DIR")
