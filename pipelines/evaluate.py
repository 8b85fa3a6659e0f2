"""`itfits evaluate`: how well a bundle classifies labelled data and catches unknowns, with plots and metrics.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .batches import file_outputs, unknown_outputs
from .bundle import load_bundle
from .errors import ItfitsError
from .images import ImagePreprocessing
from .io import write_json
from .multilabel import evaluate_multilabel
from .metrics import accepted_at_rate, auroc, balanced_accuracy, expected_calibration_error, fpr_at_tpr, nll, per_class, softmax
from .plots import plot_reliability, plot_risk_coverage
from .sources import read_source
from .unknown import compute_scores

PLAIN_RULE = 0.95  # what most fastai users write by hand: max softmax < 0.95 -> unknown


def evaluate(model: str | Path, data: str | Path, *, out: str | Path, unknown: str | Path | None = None,
             num_workers: int | None = None, tta: bool = False) -> dict:
    """Metrics of a bundle on labelled DATA (every file, whatever its split) and optional unknown examples; `tta`:
    each image's outputs averaged with its mirror image's (predict.image_batches)."""
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
        u_logits, u_feats, unreadable = unknown_outputs(bundle.scoring_model, prep, unknown, modality=modality,
                                                        options=bundle.options, num_workers=num_workers, tta=tta)
        if not len(u_logits):
            path, error = unreadable[0]
            raise ItfitsError(f"--unknown {unknown}: none of its {len(unreadable)} {modality.what} could be read; "
                              f"the first, {path}: {error}")
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
        plain_rate = float((softmax(u_logits).max(1) >= PLAIN_RULE).mean())
        metrics["plain_rule"]["unknown_accepted"] = plain_rate
        for n in calib.scores:  # the fair comparison: accept no more unknowns than the plain rule does
            metrics["scores"][n]["correct_accepted_at_plain_unknown_rate"] = accepted_at_rate(
                scores[n][correct], u_scores[n], plain_rate)
    out = Path(out)
    plot_reliability(probs, targets, out / "reliability.png")
    plot_risk_coverage(scores[calib.score], correct, out / "risk_coverage.png", threshold=calib.threshold)
    write_json(metrics, out / "metrics.json")
    return metrics
