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
