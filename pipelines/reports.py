"""Plots and tables a person looks at, written as PNG/CSV files into the run folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .io import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_lr_find(lrs, losses, suggestions: dict[str, float], chosen: str, path: Path) -> None:
    """Loss against learning rate (log scale), each suggestion marked, the chosen one named in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    for (name, lr), color in zip(suggestions.items(), ["C1", "C2", "C3", "C4"]):
        y = np.interp(np.log(lr), np.log(lrs), losses)
        ax.plot(lr, y, "o", color=color, label=f"{name}: {lr:.2e}" + (" (used)" if name == chosen else ""))
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="lr_find")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, classes: list[str]) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = actual, columns = predicted."""
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    return cm


def write_confusion_matrix(cm: np.ndarray, classes: list[str], out_dir: Path) -> None:
    """confusion_matrix.csv (actual x predicted counts) and confusion_matrix.png."""
    table = pl.DataFrame({"actual": classes, **{c: cm[:, j] for j, c in enumerate(classes)}})
    with atomic_path(out_dir / "confusion_matrix.csv") as tmp:
        table.write_csv(tmp)
    plt = _pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * n, 1.2 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="actual", title="confusion matrix (valid)")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    fig.tight_layout()
    with atomic_path(out_dir / "confusion_matrix.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_reliability(probs: np.ndarray, targets: np.ndarray, path: Path, bins: int = 10) -> None:
    """Accuracy against confidence in equal-width bins; a calibrated model lies on the diagonal."""
    conf, correct = probs.max(1), probs.argmax(1) == targets
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    acc = [correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centres, acc, width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_risk_coverage(scores: np.ndarray, correct: np.ndarray, path: Path, *, threshold: float | None = None) -> None:
    """Error rate among accepted items against the share accepted, accepting by descending score."""
    order = np.argsort(-scores)
    n = np.arange(1, len(order) + 1)
    risk = np.cumsum(~correct[order]) / n
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(n / len(order), risk)
    if threshold is not None:
        cov = float((scores >= threshold).mean())
        ax.axvline(cov, color="C1", linestyle="--", label=f"threshold: coverage {cov:.2f}")
        ax.legend()
    ax.set(xlabel="coverage (share accepted)", ylabel="risk (error rate among accepted)", title="risk-coverage")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
