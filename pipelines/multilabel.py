"""Multi-label image classification: a file may show several classes, or none of them. The run is the image one
(sources -> prepare -> image_learner -> train -> calibration -> bundle) with fastai's MultiCategoryBlock (one
sigmoid per class, BCEWithLogitsLossFlat); what differs lives here: the classes of `labels` lists, the metrics in
the history, the calibration (a temperature, a threshold per class maximising its validation F1, the unknown score
as for single-label runs) and the end of the run (run.json, bundle, report). The bundle says `"multi_label": true`
and its calibration holds `thresholds`; prediction lists every class above its threshold (predict.py)."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from .bundle import save_bundle
from .errors import ItfitsError
from .features import with_reference
from .io import write_json
from .logs import emit
from .metrics import auroc, best_f1_thresholds, binary_ece, binary_nll, multilabel_metrics, sigmoid
from .reports import Validation, guarded, write_report
from .sources import require_counts, require_splits
from .unknown import (Calibration, UnknownStats, choose_unknown_rule, compute_scores, crossfit_reference_scores,
                      fit_temperature)

if TYPE_CHECKING:
    from .run import FitConfig, TrainedImages


def label_classes(items: pl.DataFrame) -> list[str]:
    """Sorted class names of the usable items' `labels`; an ItfitsError when training cannot work with them."""
    ok = items.filter(pl.col("error").is_null())
    pairs = ok.select("labels", "split").explode("labels").drop_nulls("labels")
    counts = pairs.group_by("labels").len().sort("labels")
    require_counts(counts, "labels")
    untrained = sorted(set(counts["labels"]) - set(pairs.filter(pl.col("split") == "train")["labels"]))
    if untrained:
        raise ItfitsError(f"no training files of {', '.join(untrained)}: every file of theirs is in the valid split; "
                          "give more files, or a split column that puts some in train")
    require_splits(ok)
    return counts["labels"].to_list()


def label_counts(items: pl.DataFrame, classes: list[str]) -> dict[str, int]:
    """Usable training files per class (a file counts for each of its classes)."""
    pairs = items.filter(pl.col("error").is_null() & (pl.col("split") == "train")).explode("labels")
    counts = dict(pairs.drop_nulls("labels").group_by("labels").len().iter_rows())
    return {c: counts.get(c, 0) for c in classes}


def label_matrix(labels: list[list[str]], classes: list[str]) -> np.ndarray:
    """(N, C) 0/1 targets of each item's class names (names the classes lack are left out)."""
    index = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for i, names in enumerate(labels):
        out[i, [index[n] for n in names or () if n in index]] = 1
    return out


# ---- the metrics in the history (fastai, over a whole validation epoch, at the sigmoid's 0.5)

def _f1(preds: torch.Tensor, targs: torch.Tensor, *, average: str) -> float:
    d, y = torch.sigmoid(preds.float()) > 0.5, targs > 0.5
    tp, fp, fn = (d & y).sum(0).float(), (d & ~y).sum(0).float(), (~d & y).sum(0).float()
    if average == "micro":
        return float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1))
    return float((2 * tp / (2 * tp + fp + fn).clamp(min=1)).mean())


def multilabel_fit_metrics() -> list:
    """fastai metrics: accuracy_multi (share of right yes/no decisions), f1_macro, f1_micro."""
    from fastai.metrics import AccumMetric, accuracy_multi
    return [accuracy_multi, *(AccumMetric(partial(_f1, average=a), flatten=False, name=f"f1_{a}")
                              for a in ("macro", "micro"))]


# ---- calibration

def calibrate_multilabel(config: FitConfig, classes: list[str], *, valid: tuple, train: tuple, unknown: tuple | None,
                         head_dim: int, ref_dim: int, default_score: str) -> tuple[Calibration, dict]:
    """calibration.calibrate_outputs for (N, C) 0/1 targets: the temperature of the sigmoids, a threshold per class
    maximising its F1 on the validation items, and the unknown score and its threshold as single-label runs choose
    them (every validation item counts as known; feature statistics count a file once per class it shows)."""
    (v_logits, v_feats, v_y), (t_feats, t_y) = valid, train
    n = len(classes)
    stats = UnknownStats.fit(t_feats, t_y, n, head_dim=head_dim, ref_dim=ref_dim, seed=config.seed)
    known = {"pretrained_mahalanobis": crossfit_reference_scores(t_feats[:, -ref_dim:], t_y, n, seed=config.seed)
             } if ref_dim else None
    t = fit_temperature(v_logits, v_y, binary=True)
    probs = sigmoid(v_logits, t)
    thresholds = best_f1_thresholds(v_y, probs)
    decided = multilabel_metrics(v_y, probs >= thresholds, probs, classes)
    report = {"temperature": t,
              "valid_nll": {"before": binary_nll(sigmoid(v_logits), v_y), "after": binary_nll(probs, v_y)},
              "valid_ece": {"before": binary_ece(sigmoid(v_logits), v_y), "after": binary_ece(probs, v_y)},
              "thresholds": dict(zip(classes, thresholds.tolist())),
              "thresholds_chosen_by": f"the best F1 of each class on {len(v_y)} validation items",
              "valid_macro_f1": decided["macro_f1"], "valid_micro_f1": decided["micro_f1"],
              "valid_none_above": float((probs < thresholds).all(1).mean())}
    u_logits, u_feats = unknown if unknown is not None else (None, None)
    score, threshold, stats = choose_unknown_rule(
        v_logits, v_feats, stats, t, np.ones(len(v_y), dtype=bool), report, keep=config.keep, score=config.score,
        threshold=None if config.threshold == "auto" else float(config.threshold), unknown_logits=u_logits,
        unknown_features=u_feats, default_score=default_score, known_scores=known)
    if report["threshold_chosen_on"].endswith("correctly classified validation items"):  # every one counts here
        report["threshold_chosen_on"] = f"{len(v_y)} validation items"
    return Calibration(temperature=t, score=score, threshold=threshold, keep=config.keep,
                       thresholds=thresholds.tolist(), stats=stats), report


# ---- the end of a run: calibration, run.json, bundle, report

def finish_multilabel(modality, trained: TrainedImages, config: FitConfig, *, log=print, defaults: dict) -> dict:
    """run.finish_files for a multi-label run (rank 0's work). Returns run.json."""
    from .calibration import calibrate_images, calibration_line  # calibration imports this module
    run, learn, classes = Path(config.out), trained.learn, trained.classes
    reference = with_reference(learn.model, trained.arch, config.weights)
    calibration, calib_report, valid = calibrate_images(reference, trained.items, classes,
                                                        trained.prep, replace(config, arch=trained.arch),
                                                        modality=modality,
                                                        options=trained.options, precision=trained.precision)
    emit(log, "calibration", calibration_line(calibration, calib_report), **calib_report)
    probs, scores, _ = calibration.apply(valid["logits"], valid["features"])
    m = multilabel_metrics(valid["targets"], probs >= np.asarray(calibration.thresholds), probs, classes)
    results = {"valid_macro_f1": m["macro_f1"], "valid_micro_f1": m["micro_f1"], "valid_map": m["map"],
               "valid_subset_accuracy": m["subset_accuracy"], "valid_label_accuracy": m["label_accuracy"],
               "valid_per_class": m["per_class"],
               "valid_loss": float(trained.history["valid_loss"][trained.resolved["kept_epoch"]]),  # the kept epoch's
               "seconds": round(time.perf_counter() - trained.started, 1)}
    summary = {"config": asdict(config),
               "resolved": {**trained.resolved, "multi_label": True,
                            **modality.resolved_json(trained.options, n_valid=len(valid["targets"]))},
               "results": results, "calibration": calib_report,
               **({"check": trained.check.json()} if trained.check else {})}
    meta = {**modality.bundle_meta(trained.arch, classes, trained.prep, options=trained.options,
                                   training={**{k: v for k, v in results.items() if k != "valid_per_class"},
                                             "precision": trained.precision.name}), "multi_label": True}
    save_bundle(learn.model, meta, calibration, run / "model", reference=reference)
    write_json(summary, run / "run.json")
    report = guarded([], "report.html", write_report, run, summary, trained.history, Validation(
        logits=valid["logits"], targets=valid["targets"], names=valid["paths"], probs=probs, scores=scores,
        images=modality.report_images(trained.items, valid["paths"]), thresholds=np.asarray(calibration.thresholds)),
        defaults=defaults)
    emit(log, "done", f"valid macro F1 {m['macro_f1']:.3f}, micro F1 {m['micro_f1']:.3f}, mAP {_fmt(m['map'])}; model "
         f"bundle in {run / 'model'}; report: {report or 'not written'}", valid_macro_f1=m["macro_f1"],
         valid_micro_f1=m["micro_f1"], valid_map=m["map"], run=str(run))
    return summary


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---- itfits evaluate

def evaluate_multilabel(calib: Calibration, classes: list[str], labels: list[list[str]], logits: np.ndarray,
                        feats: np.ndarray, *, unknown: tuple | None = None) -> dict:
    """metrics.json of a multi-label bundle on files with their `labels` (and `unknown`: (logits, features) of files
    of none of the classes): per class precision/recall/F1/AP, macro and micro F1, mAP, and the unknown rule."""
    targets = label_matrix(labels, classes)
    probs, scores, flagged = calib.apply(logits, feats)
    above = probs >= np.asarray(calib.thresholds)
    m = multilabel_metrics(targets, above, probs, classes)
    accepted = ~flagged
    out = {"multi_label": True, "n_known": int(len(targets)), **m,
           "unknown_rule": {"score": calib.score, "threshold": calib.threshold, "coverage": float(accepted.mean()),
                            "none_above": float((~above.any(1)).mean()),
                            "subset_accuracy_on_accepted": float((targets[accepted] == above[accepted]).all(1).mean())
                            if accepted.any() else None}}
    if unknown is not None:
        u_probs, u_score, u_flagged = calib.apply(*unknown)
        all_scores = compute_scores(logits, feats, temperature=calib.temperature, stats=calib.stats, names=calib.scores)
        u_scores = compute_scores(*unknown, temperature=calib.temperature, stats=calib.stats, names=calib.scores)
        out["n_unknown"] = int(len(u_score))
        out["scores"] = {n: {"auroc": auroc(all_scores[n], u_scores[n])} for n in calib.scores}
        out["unknown_rule"]["unknown_flagged"] = float(u_flagged.mean())
    return out
