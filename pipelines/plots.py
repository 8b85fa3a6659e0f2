"""The plots of a run and of `itfits evaluate`, drawn on matplotlib Figures (never pyplot: the user's backend and
pyplot's figure list stay as they are) and written as PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .io import atomic_path, write_table


def _figure_axes(ncols: int = 0, *, figsize: tuple[float, float]):
    """A matplotlib Figure (no pyplot: no global figure list, and the user's backend stays as it is) and its one
    axes, or a row of `ncols` axes (an array, whatever ncols). Figure.savefig renders PNG with Agg, whatever the
    backend."""
    from matplotlib.figure import Figure  # heavy: only when a plot is drawn
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, squeeze=False)[0] if ncols else fig.subplots()


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_lr_find(lrs, losses, suggestions: dict[str, float], chosen: str, path: Path) -> None:
    """Loss against learning rate (log scale), each suggestion marked, the chosen one named in the legend."""
    fig, ax = _figure_axes(figsize=(6, 4))
    ax.plot(lrs, losses)
    for (name, lr), color in zip(suggestions.items(), ["C1", "C2", "C3", "C4"]):
        y = np.interp(np.log(lr), np.log(lrs), losses)
        ax.plot(lr, y, "o", color=color, label=f"{name}: {lr:.2e}" + (" (used)" if name == chosen else ""))
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="lr_find")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


CM_TEXT_MAX = 30  # classes up to which each cell of the confusion matrix plot shows its count
CM_PLOT_MAX = 100  # classes up to which the whole matrix is drawn; past it, the most-confused block of this many
CM_MAX_INCHES = 16.0  # the figure's side: 0.6 in per class grows to 300 in (and GBs of pixels) for 500 classes


def most_confused(cm: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the k classes with the most mistakes, as actual or as predicted class."""
    off = cm - np.diag(np.diag(cm))
    return np.sort(np.argsort(-(off.sum(0) + off.sum(1)), kind="stable")[:k])


def write_confusion_matrix(cm: np.ndarray, classes: list[str], out_dir: Path, *, split: str = "valid") -> None:
    """confusion_matrix.csv (actual x predicted counts, every class) and confusion_matrix.png: a figure of capped
    size; counts in the cells up to CM_TEXT_MAX classes; past CM_PLOT_MAX classes only the most-confused block.
    `split`: which items the counts are of, in the title."""
    table = pl.DataFrame({"actual": classes, **{c: cm[:, j] for j, c in enumerate(classes)}})
    write_table(table, out_dir / "confusion_matrix.csv")
    title = f"confusion matrix ({split})"
    if len(classes) > CM_PLOT_MAX:
        keep = most_confused(cm, CM_PLOT_MAX)
        cm, classes = cm[np.ix_(keep, keep)], [classes[i] for i in keep]
        title = f"the {CM_PLOT_MAX} most-confused classes of {len(table)} ({split}; all in confusion_matrix.csv)"
    n = len(classes)
    side = min(CM_MAX_INCHES, 1.5 + 0.6 * n)
    fig, ax = _figure_axes(figsize=(side, side - 0.3))
    ax.imshow(cm, cmap="Blues")
    if n <= CM_TEXT_MAX:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    font = min(10.0, max(4.0, 600 / n))  # labels shrink with the class count, down to what stays readable
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="actual", title=title)
    ax.set_xticklabels(classes, rotation=45 if n <= CM_TEXT_MAX else 90, ha="right" if n <= CM_TEXT_MAX else "center",
                       fontsize=font)
    ax.set_yticklabels(classes, fontsize=font)
    fig.tight_layout()
    _save(fig, out_dir / "confusion_matrix.png")


def plot_reliability(probs: np.ndarray, targets: np.ndarray, path: Path, bins: int = 10) -> None:
    """Accuracy against confidence in equal-width bins; a calibrated model lies on the diagonal."""
    conf, correct = probs.max(1), probs.argmax(1) == targets
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    acc = [correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)]
    fig, ax = _figure_axes(figsize=(4.5, 4.5))
    ax.bar(centres, acc, width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def plot_risk_coverage(scores: np.ndarray, correct: np.ndarray, path: Path, *, threshold: float | None = None) -> None:
    """Error rate among accepted items against the share accepted, accepting by descending score."""
    order = np.argsort(-scores)
    n = np.arange(1, len(order) + 1)
    risk = np.cumsum(~correct[order]) / n
    fig, ax = _figure_axes(figsize=(5, 4))
    ax.plot(n / len(order), risk)
    if threshold is not None:
        cov = float((scores >= threshold).mean())
        ax.axvline(cov, color="C1", linestyle="--", label=f"threshold: coverage {cov:.2f}")
        ax.legend()
    ax.set(xlabel="coverage (share accepted)", ylabel="risk (error rate among accepted)", title="risk-coverage")
    fig.tight_layout()
    _save(fig, path)


def plot_score_histograms(groups: dict[str, np.ndarray], path: Path, *, threshold: float, score: str) -> None:
    """The unknown score's distribution in each group (e.g. correct known, wrong known, unknown items), on shared
    bins, with the threshold drawn: items left of it are flagged unknown."""
    values = [v for v in groups.values() if len(v)]
    drawn = [threshold] if np.isfinite(threshold) else []  # -inf: a bundle that flags nothing
    lo, hi = min([v.min() for v in values] + drawn), max([v.max() for v in values] + drawn)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
    fig, ax = _figure_axes(figsize=(6.5, 4))
    for (name, v), color in zip(groups.items(), ["C0", "C3", "C1", "C2"]):
        if len(v):
            ax.hist(v, bins=bins, alpha=0.5, color=color, label=f"{name} ({len(v)})")
    if drawn:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel=f"{score} (higher = more like a known class)", ylabel="items",
           title="unknown score: known and unknown items")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_roc(known: np.ndarray, unknown: np.ndarray, path: Path, *, threshold: float, auroc: float,
             score: str) -> None:
    """ROC of telling known from unknown items by the score: share of known items kept against share of unknowns
    accepted, one point per threshold; the bundle's threshold marked."""
    cuts = np.unique(np.concatenate([known, unknown, [np.inf]]))[::-1]  # from accepting nothing to everything
    kept = 1 - np.searchsorted(np.sort(known), cuts, side="left") / len(known)  # share >= each cut
    accepted = 1 - np.searchsorted(np.sort(unknown), cuts, side="left") / len(unknown)
    fig, ax = _figure_axes(figsize=(4.8, 4.5))
    ax.plot(accepted, kept, label=f"{score}: AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    ax.plot(float((unknown >= threshold).mean()), float((known >= threshold).mean()), "o", color="C1",
            label="the bundle's threshold")
    ax.set(xlabel="unknowns accepted (false positive rate)", ylabel="known items kept (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title="ROC: known against unknown")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


THROUGHPUT = ("seconds", "images", "images_per_s", "rows", "rows_per_s")  # history columns of speed, not quality


def plot_losses(history: pl.DataFrame, path: Path) -> None:
    """losses_figure as a PNG file."""
    _save(losses_figure(history), path)


def losses_figure(history: pl.DataFrame):
    """Train/valid loss per epoch, then each validation metric on its own axis (accuracy 0..1 beside a loss of 2
    would be a flat line), the per-class recalls (balance.balance_metrics: `recall_<class>`) together on one;
    throughput (images/s) left out. The frozen (head-only) epochs of fine_tune shaded."""
    epochs = history["epoch"].to_numpy()
    recalls = [c for c in history.columns if c.startswith("recall_")]
    metrics = [c for c in history.columns
               if c not in ("epoch", "phase", "train_loss", "valid_loss", *THROUGHPUT, *recalls)]
    fig, axes = _figure_axes(1 + len(metrics) + bool(recalls), figsize=(4.5 * (1 + len(metrics) + bool(recalls)), 3.8))
    for col in ("train_loss", "valid_loss"):
        if col in history.columns:
            axes[0].plot(epochs, history[col].to_numpy(), "o-", label=col.replace("_", " "))
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    for ax, col in zip(axes[1:], metrics):
        ax.plot(epochs, history[col].to_numpy(), "o-", color="C2", label=col.replace("_", " "))
        ax.set(xlabel="epoch", ylabel=col.replace("_", " "), title=f"validation {col.replace('_', ' ')}")
    for col in recalls:
        axes[-1].plot(epochs, history[col].to_numpy(), "o-", label=col.removeprefix("recall_"))
    if recalls:
        axes[-1].set(xlabel="epoch", ylabel="recall", title="validation recall per class")
    frozen = epochs[(history["phase"] == "frozen").to_numpy()] if "phase" in history.columns else []
    for ax in axes:
        if len(frozen):
            ax.axvspan(frozen.min() - 0.5, frozen.max() + 0.5, color="gray", alpha=0.15, label="frozen (head only)")
        ax.set_xticks(epochs)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_predicted_vs_actual(actual: np.ndarray, predicted: np.ndarray, path: Path, *, target: str) -> None:
    """Each validation row's prediction against its true value; a perfect model puts every point on the diagonal."""
    fig, ax = _figure_axes(figsize=(4.5, 4.5))
    ax.scatter(actual, predicted, s=12, alpha=0.6)
    lo, hi = min(actual.min(), predicted.min()), max(actual.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "--", color="gray", label="predicted = actual")
    ax.set(xlabel=f"actual {target}", ylabel=f"predicted {target}", title="predicted against actual (valid)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)
