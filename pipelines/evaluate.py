"""`itfits evaluate`: how well a bundle classifies labelled data and catches unknowns, with plots and metrics.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .bundle import load_bundle
from .errors import ItfitsError
from .images import ImagePreprocessing
from .io import write_json
from .predict import image_outputs
from .sources import check_files, expand_inputs, read_source
from .unknown import SCORES, auroc, compute_scores, expected_calibration_error, fpr_at_tpr, nll, softmax

PLAIN_RULE = 0.95  # what most fastai users write by hand: max softmax < 0.95 -> unknown


def per_class(targets: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict[str, dict]:
    out = {}
    for i, c in enumerate(classes):
        tp = int(((preds == i) & (targets == i)).sum())
        out[c] = {"precision": tp / max(1, int((preds == i).sum())), "recall": tp / max(1, int((targets == i).sum())),
                  "support": int((targets == i).sum())}
    return out


def evaluate(model: str | Path, data: str | Path, *, out: str | Path, unknown: str | Path | None = None,
             num_workers: int | None = None) -> dict:
    """Metrics of a bundle on labelled DATA (every file, whatever its split) and optional unknown examples."""
    from .reports import plot_reliability, plot_risk_coverage

    bundle = load_bundle(model)
    if bundle.meta.get("modality") == "tabular":
        raise ItfitsError(f"{model} is a tabular model; itfits evaluate takes image models for now. Its validation "
                          "figures are in the run's run.json; for new rows, itfits predict MODEL rows.csv --out FILE")
    classes, calib = bundle.classes, bundle.calibration
    items = check_files(read_source(data)).filter(pl.col("error").is_null())
    foreign = sorted(set(items["label"]) - set(classes))
    if foreign:
        raise ItfitsError(f"classes in {data} that the model does not know: {', '.join(foreign)}; "
                          f"pass examples of none of its classes with --unknown DIR instead")
    if items.height == 0:
        raise ItfitsError(f"no usable files in {data}")
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    logits, feats, _ = image_outputs(bundle.model, prep, items["path"].to_list(), num_workers=num_workers)
    targets = np.array([classes.index(c) for c in items["label"]])
    probs = softmax(logits, calib.temperature)
    preds = probs.argmax(1)
    correct = preds == targets
    scores = compute_scores(logits, feats, temperature=calib.temperature, stats=calib.stats)
    accepted = scores[calib.score] >= calib.threshold
    plain_accepted = softmax(logits).max(1) >= PLAIN_RULE
    metrics = {
        "n_known": int(len(targets)),
        "accuracy": float(correct.mean()),
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
        u_paths = [p for p, err in expand_inputs([str(unknown)]) if err is None]
        if not u_paths:
            raise ItfitsError(f"--unknown {unknown}: no image files found")
        u_logits, u_feats, u_errors = image_outputs(bundle.model, prep, u_paths, num_workers=num_workers)
        good = np.array([not e for e in u_errors])
        u_scores = compute_scores(u_logits[good], u_feats[good], temperature=calib.temperature, stats=calib.stats)
        metrics["n_unknown"] = int(good.sum())
        metrics["scores"] = {n: {"auroc": auroc(scores[n], u_scores[n]), "fpr95": fpr_at_tpr(scores[n], u_scores[n])}
                             for n in SCORES}
        metrics["unknown_rule"]["unknown_accepted"] = float((u_scores[calib.score] >= calib.threshold).mean())
        metrics["plain_rule"]["unknown_accepted"] = float((softmax(u_logits[good]).max(1) >= PLAIN_RULE).mean())
    out = Path(out)
    plot_reliability(probs, targets, out / "reliability.png")
    plot_risk_coverage(scores[calib.score], correct, out / "risk_coverage.png", threshold=calib.threshold)
    write_json(metrics, out / "metrics.json")
    return metrics
