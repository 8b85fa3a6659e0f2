"""Imbalanced classes: `--balance auto|weights|sampler|none`, chosen from the training items' class counts, and the
metrics that show what it does (balanced accuracy, per-class recall) in the history.

weights: cross-entropy with class weights N / (C * n_c), so every class carries the same share of the loss and an
epoch still sees every item once. sampler: fastai's WeightedDL draws training items with probability 1 / n_c of
their class, so batches hold the classes about equally (minority items repeat, under augmentation). auto: weights
when the largest class has more than IMBALANCE_RATIO times the items of the smallest, else none; weights rather
than the sampler because nothing repeats and the epoch stays the same length (bench/BENCHMARKS.md, "Imbalanced
classes", measures both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .errors import ItfitsError

BALANCE = ("auto", "weights", "sampler", "none")
IMBALANCE_RATIO = 3.0  # largest / smallest class above this: auto balances (issue 19)
MAX_RECALL_COLUMNS = 30  # per-class recall columns in the history up to this many classes (run.json has them all)


def check_balance(value: str) -> str:
    if value not in BALANCE:
        raise ItfitsError(f"--balance must be one of {', '.join(BALANCE)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Balance:
    """What a run does about its class counts, and why (printed, and run.json's resolved.balance)."""
    method: str  # weights | sampler | none
    reason: str
    counts: dict[str, int]  # training items per class
    weights: dict[str, float]  # loss weight (weights) or relative draw probability per item (sampler) per class

    @property
    def ratio(self) -> float:
        return max(self.counts.values()) / max(1, min(self.counts.values()))

    def line(self) -> str:
        return f"class balance: {self.method} ({self.reason})"

    def json(self) -> dict:
        return {"method": self.method, "reason": self.reason, "ratio": round(self.ratio, 3), "counts": self.counts,
                "weights": self.weights}

    def loss_weights(self, classes: list[str]) -> torch.Tensor | None:
        """The cross-entropy class weights in `classes` order, or None (every class weighs 1)."""
        return torch.tensor([self.weights[c] for c in classes], dtype=torch.float32) if self.method == "weights" else None

    def item_weights(self, labels: list[str]) -> list[float] | None:
        """The sampler's weight of each training item by its label, or None (every item as likely). A label that is
        no class (--outlier-exposure examples) is drawn as often as a class."""
        if self.method != "sampler":
            return None
        n = {label: labels.count(label) for label in set(labels)}
        return [self.weights.get(label, 1.0 / n[label]) for label in labels]


def no_balance(counts: dict[str, int], reason: str) -> Balance:
    """The Balance of a run that balances nothing, and why."""
    return Balance(method="none", reason=reason, counts=dict(counts), weights={c: 1.0 for c in counts})


def choose_balance(counts: dict[str, int], mode: str = "auto") -> Balance:
    """The Balance for training items of `counts` per class under --balance `mode`."""
    check_balance(mode)
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = counts[largest] / max(1, counts[smallest])
    said = f"largest class {largest} has {counts[largest]} training items, smallest {smallest} {counts[smallest]}: " \
           f"{ratio:.1f}x"
    if mode == "auto":
        method = "weights" if ratio > IMBALANCE_RATIO else "none"
        reason = f"auto: {said}, {'over' if method == 'weights' else 'not over'} {IMBALANCE_RATIO:g}x" + (
            "; class-weighted loss" if method == "weights" else "")
    else:
        method, reason = mode, f"--balance {mode}; {said}"
    total, n_classes = sum(counts.values()), len(counts)
    if method == "weights":
        weights = {c: total / (n_classes * max(1, n)) for c, n in counts.items()}
    elif method == "sampler":
        weights = {c: 1.0 / max(1, n) for c, n in counts.items()}
    else:
        weights = {c: 1.0 for c in counts}
    return Balance(method=method, reason=reason, counts=dict(counts), weights=weights)


# ---- metrics in the history: numpy's metrics.per_class, as fastai metrics over a whole validation epoch

def _recall(preds: torch.Tensor, targs: torch.Tensor, *, cls: int) -> float:
    """Recall of class `cls`; NaN when validation holds none of it."""
    mask = targs == cls
    return float((preds[mask] == cls).float().mean()) if mask.any() else math.nan


def _balanced_accuracy(preds: torch.Tensor, targs: torch.Tensor, *, n_classes: int) -> float:
    """The mean recall over the classes validation holds (scikit-learn's balanced_accuracy_score)."""
    recalls = [_recall(preds, targs, cls=c) for c in range(n_classes)]
    return float(np.nanmean(recalls)) if not all(math.isnan(r) for r in recalls) else math.nan


def balance_metrics(classes: list[str]) -> list:
    """fastai metrics: balanced_accuracy, then recall_<class> per class (up to MAX_RECALL_COLUMNS classes)."""
    from fastai.metrics import AccumMetric
    out = [AccumMetric(partial(_balanced_accuracy, n_classes=len(classes)), dim_argmax=-1, flatten=False,
                       name="balanced_accuracy")]
    if len(classes) <= MAX_RECALL_COLUMNS:
        out += [AccumMetric(partial(_recall, cls=i), dim_argmax=-1, flatten=False, name=f"recall_{c}")
                for i, c in enumerate(classes)]
    return out
