"""Metrics on model outputs as numpy arrays: probabilities, calibration, unknown detection, confusion, per class,
regression. numpy only (no torch, no scipy): unknown.py, evaluate.py and reports.py all draw on it, and none of them
on each other for it."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) probabilities of (N, C) logits divided by `temperature`."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def item_losses(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N,) cross-entropy of each item, as fastai's loss gives it at temperature 1."""
    p = softmax(logits, temperature)[np.arange(len(targets)), targets]
    return -np.log(np.clip(p, 1e-12, None))


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets."""
    return float(item_losses(logits, targets, temperature).mean())


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf, correct = probs.max(1), probs.argmax(1) == targets
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(correct[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given the mean of their ranks (scipy's rankdata 'average')."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # the rank of each distinct value's last copy
    return ((ends - (counts - 1) / 2)[inverse]).astype(float)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of a known item > score of an unknown item), ties counted half (Mann-Whitney)."""
    ranks = _average_ranks(np.concatenate([known, unknown]))
    n1, n2 = len(known), len(unknown)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def threshold_for_share(scores: np.ndarray, share: float) -> float:
    """The highest threshold t with at least `share` of `scores` >= t."""
    ordered = np.sort(scores)
    return float(ordered[min(len(ordered) - 1, int(np.floor(len(ordered) * (1 - share) + 1e-9)))])


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Share of unknown items accepted when the threshold accepts `tpr` of the known items."""
    return float((unknown >= threshold_for_share(known, tpr)).mean())


def accepted_at_rate(known: np.ndarray, unknown: np.ndarray, rate: float) -> float:
    """Share of `known` accepted by the lowest threshold that accepts at most `rate` of `unknown`."""
    k = int(np.floor(rate * len(unknown) + 1e-9))
    cut = np.sort(unknown)[::-1][k] if k < len(unknown) else -np.inf  # accept strictly above the (k+1)-th highest
    return float((known > cut).mean()) if len(known) else 0.0


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, classes: list[str]) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = actual, columns = predicted."""
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    return cm


def per_class(targets: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """{class: {precision, recall, support}}; a class never predicted (or never present) gets 0, not NaN."""
    out = {}
    for i, c in enumerate(classes):
        tp = int(((preds == i) & (targets == i)).sum())
        out[c] = {"precision": tp / max(1, int((preds == i).sum())), "recall": tp / max(1, int((targets == i).sum())),
                  "support": int((targets == i).sum())}
    return out


def balanced_accuracy(targets: np.ndarray, preds: np.ndarray) -> float:
    """The mean recall over the classes `targets` holds (scikit-learn's balanced_accuracy_score)."""
    present = np.unique(targets)
    return float(np.mean([(preds[targets == c] == c).mean() for c in present])) if len(present) else float("nan")


def regression_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Validation RMSE, MAE and R² in the target's units (run.json's results)."""
    err = pred - truth
    return {"valid_rmse": float(np.sqrt((err ** 2).mean())), "valid_mae": float(np.abs(err).mean()),
            "valid_r2": float(1 - (err ** 2).sum() / max(((truth - truth.mean()) ** 2).sum(), 1e-12))}


# ---- multi-label: targets and decisions are (N, C) 0/1 matrices, one column per class

def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) independent probabilities of (N, C) logits divided by `temperature` (a multi-label model's)."""
    return 1.0 / (1.0 + np.exp(-np.clip(logits / temperature, -80, 80)))


def binary_nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy over every item and class (fastai's BCEWithLogitsLossFlat)."""
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())


def binary_ece(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE of every (item, class) probability as a yes/no forecast: mean |share of yes - mean probability| over
    equal-width bins, weighted by bin size."""
    p, y = probs.ravel(), targets.ravel().astype(float)
    idx = np.clip(np.digitize(p, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    return float(sum(abs(y[idx == b].mean() - p[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall steps of one class (scikit-learn's average_precision_score): the sum over
    distinct score thresholds, highest first, of precision there times the recall it adds. NaN without positives."""
    y = np.asarray(targets, dtype=bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the last item of each group of tied scores
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(targets: np.ndarray, decisions: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Per-class precision, recall, F1 and support; macro F1 (mean over the classes), micro F1 (over all counts),
    mAP (mean average precision over the classes with a positive item), subset accuracy (every class right) and
    label accuracy (share of right (item, class) decisions, fastai's accuracy_multi). A ratio with nothing to
    count is 0, as scikit-learn's zero_division=0."""
    y, d = np.asarray(targets, dtype=bool), np.asarray(decisions, dtype=bool)
    tp, fp, fn = (y & d).sum(0), (~y & d).sum(0), (y & ~d).sum(0)
    ratio = lambda a, b: np.divide(a, b, out=np.zeros(len(a)), where=b > 0)  # noqa: E731
    precision, recall, f1 = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)
    ap = np.array([average_precision(y[:, j], probs[:, j]) for j in range(y.shape[1])])
    micro = 2 * tp.sum() / max(1, 2 * tp.sum() + fp.sum() + fn.sum())
    return {"per_class": {c: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                              "average_precision": None if np.isnan(ap[j]) else float(ap[j]),
                              "support": int(y[:, j].sum())} for j, c in enumerate(classes)},
            "macro_f1": float(f1.mean()), "micro_f1": float(micro),
            "map": float(np.nanmean(ap)) if not np.isnan(ap).all() else None,
            "subset_accuracy": float((y == d).all(1).mean()), "label_accuracy": float((y == d).mean())}


def best_f1_thresholds(targets: np.ndarray, probs: np.ndarray, default: float = 0.5) -> np.ndarray:
    """(C,) per-class thresholds on `probs` maximising each class's F1 on these items: halfway between the
    lowest probability the best cut accepts and the next lower one (a margin both ways), or `default` for a
    class without a positive item. Ties in F1 go to the higher threshold (fewer false alarms)."""
    y = np.asarray(targets, dtype=bool)
    out = np.full(y.shape[1], default, dtype=np.float64)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        p, yj = probs[order, j], y[order, j]
        last = np.r_[np.flatnonzero(p[1:] != p[:-1]), len(p) - 1]  # accepting down to each distinct probability
        tp = np.cumsum(yj)[last]
        f1 = 2 * tp / (last + 1 + yj.sum())
        k = int(np.argmax(f1))  # the first best: the highest cut
        below = p[last[k] + 1] if last[k] + 1 < len(p) else 0.0
        out[j] = (p[last[k]] + below) / 2
    return out
