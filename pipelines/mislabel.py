"""Likely mislabelled files: confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating
Uncertainty in Dataset Labels") on out-of-fold probabilities of a logistic regression on the pretrained body's
pooled features, the features the unknown score uses (features.stage_features of the reference body).

The pretrained body never trained on these files, and each file's probabilities come from a regression fitted on
the other folds, so a file cannot vouch for its own label. The count is written here in numpy (about 40 lines)
rather than taken from cleanlab: its source is AGPL-3.0 (Cleanlab Inc.'s file headers) and it brings pandas and
scikit-learn, for the same arithmetic.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .backbones import create_body, get_spec
from .features import stage_features
from .batches import ImageFiles
from .images import ImagePreprocessing

FOLDS = 5
L2 = 0.1  # weight decay of the logistic regression on standardised features (on the mean loss). On data/fashion
# with 4 and 5 planted swaps (efficientnet_lite0 features at 48..96 px): 0.1 found 8 of the 9 (not a bag that
# looks like a shoe) and no other file; 1e-2 found 9 and up to 3 others, 1e-3 up to 3 others. Chosen on that one
# set, not a suite: overconfident out-of-fold probabilities (weak decay, ~200 items in 192 dimensions) flag
# correctly labelled look-alikes
MIN_PER_CLASS = 2  # fewer files of a class than this: no out-of-fold estimate for it, the pass is skipped


def _logistic(x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = L2, steps: int = 100) -> tuple:
    """(weights, bias, mean, std) of a multinomial logistic regression on standardised x, L-BFGS in torch (float64:
    a few hundred features converge in tens of iterations)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).double()
    yt = torch.from_numpy(y).long()
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy(), mean, std


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = FOLDS,
                      seed: int = 0) -> np.ndarray:
    """(N, C) probabilities of each item from a logistic regression fitted on the other folds; folds stratified
    (each class dealt round the folds in a seeded order)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), int)
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % folds
    probs = np.zeros((len(labels), n_classes))
    for f in range(folds):
        test = fold == f
        if not test.any():
            continue
        w, b, mean, std = _logistic(features[~test].astype(np.float64), labels[~test], n_classes)
        logits = ((features[test] - mean) / std) @ w + b
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs[test] = e / e.sum(1, keepdims=True)
    return probs


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(issue mask, suggested class, margin) per item, by confident learning's prune-by-noise-rate:
    - per class j, the threshold t_j: the mean probability of j over the items labelled j;
    - the confident joint C[i, j]: items labelled i whose probability of j reaches t_j (the likeliest such j where
      several do), calibrated so each row sums to the count of label i;
    - from the items labelled i, the round(C[i, j]) (j != i) with the largest margin p_j - p_i are issues;
    - as cleanlab does, an item whose likeliest class is its label is no issue.
    margin: p(suggested) - p(given), higher = more surely mislabelled."""
    n, k = probs.shape
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array([probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    above = probs >= thresholds[None] - 1e-12
    confident = np.where(above, probs, -1).argmax(1)
    has = above.any(1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[has], confident[has]), 1)
    joint = joint / np.clip(joint.sum(1, keepdims=True), 1, None) * counts[:, None]  # calibrated
    issue = np.zeros(n, bool)
    for i in range(k):
        for j in range(k):
            m = int(round(joint[i, j]))
            if i == j or m == 0:
                continue
            idx = np.flatnonzero(labels == i)
            margin = probs[idx, j] - probs[idx, i]
            issue[idx[np.argsort(-margin, kind="stable")[:m]]] = True
    issue &= probs.argmax(1) != labels
    suggested = probs.argmax(1)
    margin = probs[np.arange(n), suggested] - probs[np.arange(n), labels]
    return issue, suggested, margin


def mislabel_rows(paths: list[str], labels: list[str], features: np.ndarray, classes: list[str], *,
                  seed: int = 0) -> tuple[list[tuple], dict[str, float], list[str]]:
    """(rows of check.FINDINGS of kind `mislabelled`, {"mislabel": seconds}, notes) for items with pretrained
    `features` (N, D)."""
    t0 = time.perf_counter()
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[lab] for lab in labels], int)
    counts = np.bincount(y, minlength=len(classes))
    if len(paths) < 2 * FOLDS or (counts < MIN_PER_CLASS).any():
        return [], {"mislabel": time.perf_counter() - t0}, [
            f"mislabel pass skipped: {len(paths)} files, fewest in a class {counts.min()} (it needs {MIN_PER_CLASS} "
            f"of each class and {2 * FOLDS} in all)"]
    probs = out_of_fold_probs(features, y, len(classes), seed=seed)
    issue, suggested, margin = confident_learning(probs, y)
    rows = [(paths[i], "mislabelled", None, labels[i], classes[suggested[i]], float(margin[i]),
             f"out-of-fold p({classes[suggested[i]]}) {probs[i, suggested[i]]:.2f}, p({labels[i]}) "
             f"{probs[i, y[i]]:.2f}") for i in np.flatnonzero(issue)]
    return rows, {"mislabel": time.perf_counter() - t0}, []


def reference_features(paths: list[str], *, arch: str, weights: str = "auto", size: int | None = None,
                       batch_size: int = 64, num_workers: int = 0, progress=None) -> tuple[np.ndarray, list[str]]:
    """((N, D) pooled features of the last-stage input of `arch`'s pretrained body, the errors ("" = read)) of image
    files, the features fit's reference body gives the unknown score. `progress(done, total)` after each batch."""
    spec = get_spec(arch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    body = create_body(spec, weights=weights)[0].eval().to(device)
    prep = ImagePreprocessing(size=size or spec.input_size, mean=spec.mean, std=spec.std)

    def stack(batch):  # ImageFiles' items -> (uint8 (B, 3, size, size), errors)
        return torch.from_numpy(np.stack([x for x, _ in batch])), [e for _, e in batch]
    loader = torch.utils.data.DataLoader(ImageFiles([(p, None) for p in paths], prep), batch_size=batch_size,
                                         collate_fn=stack, num_workers=num_workers)
    feats, errors = [], []
    with torch.inference_mode():
        for x, errs in loader:
            feats.append(stage_features(body, prep.normalize(x.to(device))).float().cpu().numpy())
            errors += errs
            if progress is not None:
                progress(len(errors), len(paths))
    return (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)), errors
