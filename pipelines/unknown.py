"""Unknown handling: temperature calibration, unknown scores and threshold choice from data (their metrics: metrics.py;
the calibration of a fit: calibration.py).

Every score is "higher = more likely one of the known classes". The features a model gives for the scores are
[the head's penultimate features | the pooled input of the body's last stage] (features.forward_features;
tabular models give the first part only). What a score needs besides the logits (banks of training features for
kNN, class means and a precision matrix for Mahalanobis, the standardisation of the combined score) is kept in
`UnknownStats` and saved into the bundle's safetensors file; the JSON keeps the scalars.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import ItfitsError
from .metrics import auroc, expected_calibration_error, fpr_at_tpr, nll, sigmoid, softmax, threshold_for_share

SCORES = ("max_softmax", "max_logit", "energy", "knn", "mahalanobis", "combined", "pretrained_mahalanobis")
REFERENCE_SCORES = ("pretrained_mahalanobis",)  # the scores on the pretrained reference body's features
LOGIT_SCORES = SCORES[:3]  # the scores that need no training statistics
# best AUROC, and the most correct items kept at the plain 0.95 rule's unknown acceptance, on held-out classes in
# bench/unknown_scores.py (see bench/BENCHMARKS.md)
DEFAULT_SCORE = "pretrained_mahalanobis"
# tables: Mahalanobis on the MLP's features caught each held-out penguin species best (AUROC 0.93-1.0, combined
# 0.79-0.94: max softmax, one of its parts, is near chance there; README "Tabular")
TABLE_DEFAULT_SCORE = "mahalanobis"
KNN_K = 5
KNN_BANK_MAX = 2048  # training features kept for kNN (fp16): at most 2048 x D, a few MB for D = 512-1280


def fit_temperature(logits: np.ndarray, targets: np.ndarray, *, binary: bool = False) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on held-out data (Guo et al. 2017); `binary`: the
    binary cross-entropy of sigmoid(logits / T) against (N, C) 0/1 targets (multi-label). T in [0.05, 20].
    The NLL is convex in 1/T, so one-dimensional in log T with a single minimum: a golden-section search finds it
    to 1e-9 in numpy (torch's LBFGS imports torch._dynamo at its first use: 1.5-2 s of a table's fit)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets)

    def loss(log_t: float) -> float:
        z = x / np.exp(log_t)
        if binary:  # log(1 + e^z) - y z, stable
            return float((np.logaddexp(0.0, z) - y * z).mean())
        z = z - z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())

    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-9:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))


@dataclass
class UnknownStats:
    """Feature statistics of the training set that the feature-space scores need (D = head feature size, M =
    size of the body's pooled stage features, 0 for tabular models)."""
    bank: np.ndarray  # (N, D) L2-normalised head features of training items, for kNN
    means: np.ndarray  # (C, D) class means, for Mahalanobis
    precision: np.ndarray  # (D, D) inverse of the shared within-class covariance
    stage_bank: np.ndarray  # (N, M) L2-normalised stage features of the same items, for the combined score
    combine: np.ndarray  # (K, 2) mean and std on validation items of each part of the combined score
    # Mahalanobis++ on the reference body's features (R of them; 0: a model without reference, or older bundle)
    ref_means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (C, R), L2-normalised
    ref_precision: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (R, R)

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray, n_classes: int, *, head_dim: int, ref_dim: int = 0,
            seed: int = 0) -> "UnknownStats":
        """From training features [head (head_dim) | stage | reference (ref_dim)] and their targets: class indices
        (N,), or (N, C) 0/1 of a multi-label run, where an item counts for each of its classes."""
        stage = features[:, head_dim:features.shape[1] - ref_dim].astype(np.float32)
        feats = features[:, :head_dim].astype(np.float64)
        rng = np.random.default_rng(seed)
        keep = rng.permutation(len(feats))[:KNN_BANK_MAX]
        rows, classes = class_pairs(targets)
        means = _class_means(feats[rows], classes, n_classes)
        centred = feats[rows] - means[classes]
        cov = centred.T @ centred / max(1, len(rows) - 1)
        cov += np.eye(cov.shape[0]) * (1e-3 * np.trace(cov) / cov.shape[0] + 1e-8)  # shrinkage: D can exceed N
        ref_means, ref_precision = (mahalanobis_pp_fit(features[:, -ref_dim:], targets, n_classes) if ref_dim else
                                    (np.zeros((0, 0), np.float32),) * 2)
        return cls(bank=_l2(feats[keep]).astype(np.float16), means=means.astype(np.float32),
                   precision=np.linalg.inv(cov).astype(np.float32), stage_bank=_l2(stage[keep]).astype(np.float16),
                   combine=np.zeros((0, 2), np.float32), ref_means=ref_means, ref_precision=ref_precision)

    @property
    def scores(self) -> tuple[str, ...]:
        """The scores these statistics serve (older bundles lack the combined score's and the reference's)."""
        lacking = {"combined"} if not len(self.combine) else set()
        lacking |= set(REFERENCE_SCORES) if not self.ref_dim else set()
        return tuple(n for n in SCORES if n not in lacking)

    @property
    def head_dim(self) -> int:
        return self.bank.shape[1]

    @property
    def ref_dim(self) -> int:
        return self.ref_means.shape[1]

    @property
    def n_features(self) -> int:
        """Feature columns a model with these statistics gives: head, stage and reference parts."""
        return self.head_dim + self.stage_bank.shape[1] + self.ref_dim

    def combined_parts(self, logits: np.ndarray, features: np.ndarray, temperature: float) -> np.ndarray:
        """(N, K) the parts of the combined score, unstandardised: kNN on head features, kNN on stage features
        (when the model has them) and log calibrated max softmax. Each sees unknowns a different way (distance to
        training items in the classifier's own space, in a more generic mid-level space, and the classifier's
        doubt); on held-out classes their standardised sum beats each alone (bench/BENCHMARKS.md)."""
        parts = [_knn(features[:, :self.head_dim], self.bank)]
        if self.stage_bank.shape[1]:
            parts.append(_knn(features[:, self.head_dim:self.head_dim + self.stage_bank.shape[1]], self.stage_bank))
        parts.append(np.log(np.clip(softmax(logits, temperature).max(1), 1e-30, None)))
        return np.stack(parts, 1)

    def with_combine(self, logits: np.ndarray, features: np.ndarray, temperature: float) -> "UnknownStats":
        """These statistics, with each part of the combined score standardised on validation items (known,
        unseen in training)."""
        parts = self.combined_parts(logits, features, temperature)
        std = parts.std(0) if len(parts) > 1 else np.ones(parts.shape[1])
        return replace(self, combine=np.stack([parts.mean(0), np.clip(std, 1e-6, None)], 1).astype(np.float32))

    def tensors(self) -> dict[str, torch.Tensor]:
        arrays = self.__dict__ if self.ref_dim else {k: v for k, v in self.__dict__.items() if not k.startswith("ref_")}
        return {f"unknown.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "UnknownStats":
        fields = {k: tensors[f"unknown.{k}"].numpy() for k in ("bank", "means", "precision")}
        # bundles from before the combined score have neither: it is then unavailable, the others work
        fields["stage_bank"] = tensors["unknown.stage_bank"].numpy() if "unknown.stage_bank" in tensors else \
            np.zeros((len(fields["bank"]), 0), np.float16)
        fields["combine"] = tensors["unknown.combine"].numpy() if "unknown.combine" in tensors else np.zeros((0, 2))
        for k in ("ref_means", "ref_precision"):  # bundles from before the reference body lack them
            if f"unknown.{k}" in tensors:
                fields[k] = tensors[f"unknown.{k}"].numpy()
        return cls(**fields)


def class_pairs(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item rows, class indices): the items themselves for (N,) class indices; for (N, C) 0/1 multi-label targets
    one pair per class an item shows (an item of none: no pair)."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return np.arange(len(targets)), targets
    rows, classes = np.nonzero(targets > 0.5)
    return rows, classes


def _class_means(x: np.ndarray, targets: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([x[targets == c].mean(0) if (targets == c).any() else np.zeros(x.shape[1])
                     for c in range(n_classes)])


REF_SHRINK = 0.1  # the least share of the scaled identity in the shared covariance (OAS may choose more)


def ref_shrinkage(centred: np.ndarray) -> float:
    """The share of the scaled identity in the shared covariance of `centred` (N, R) rows: the oracle approximating
    shrinkage (OAS, Chen et al. 2010), at least REF_SHRINK. R (192-1280) is often above N: the plain covariance
    then has empty directions, a new item's distance along them is magnified, and the same item scores far lower
    against statistics of 0.8 N items than of N (the threshold landed loose, issue 26); OAS shrinks more the fewer
    items there are."""
    n, p = centred.shape
    s = centred.T @ centred / max(1, n)
    tr, tr2 = np.trace(s), float((s * s).sum())
    den = (n + 1 - 2 / p) * (tr2 - tr ** 2 / p)
    oas = 1.0 if den <= 0 else ((1 - 2 / p) * tr2 + tr ** 2) / den
    return float(np.clip(oas, REF_SHRINK, 1.0))


def _shared_covariance(x: np.ndarray, targets: np.ndarray, n_classes: int):
    """(class means, within-class scatter, shrinkage, identity scale) of L2-normalised rows `x`, class indices."""
    means = _class_means(x, targets, n_classes)
    centred = x - means[targets]
    scatter = centred.T @ centred
    trace = np.trace(scatter) / max(1, len(x) - 1)
    scale = trace / len(scatter) if trace > 0 else 1.0  # 0: one training item per class
    return means, scatter, ref_shrinkage(centred), scale


def mahalanobis_pp_fit(x: np.ndarray, targets: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mahalanobis++ (Mueller & Hein 2025): class means and the precision of the shared within-class covariance of
    L2-normalised features, shrunk toward a multiple of the identity (ref_shrinkage). `targets` as UnknownStats.fit
    takes them."""
    rows, targets = class_pairs(targets)
    x = _l2(x[rows].astype(np.float64))
    means, scatter, a, scale = _shared_covariance(x, targets, n_classes)
    cov = (1 - a) * scatter / max(1, len(x) - 1) + a * scale * np.eye(len(scatter))
    return means.astype(np.float32), np.linalg.inv(cov).astype(np.float32)


def loo_reference_scores(x: np.ndarray, targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Leave-one-out pretrained_mahalanobis scores of training items (class indices, single-label): each item
    scored by the statistics of all the others, as a new item is scored by statistics of all of them. (Five-fold
    scores, made by statistics of 0.8 N items, ran far lower than new items' when R is near N, and the threshold
    landed loose.) Leaving item i of class c out moves its class mean by -r_i / (n_c - 1) and takes
    n_c / (n_c - 1) r_i r_i^T from the scatter (r_i: its offset from its class mean); the shrinkage and its scale
    are held. One inverse then serves every item (Sherman-Morrison). An item alone in its class is scored against
    the other classes."""
    y = np.asarray(targets)
    x = _l2(x.astype(np.float64))
    n = len(x)
    means, scatter, a, scale = _shared_covariance(x, y, n_classes)
    counts = np.bincount(y, minlength=n_classes)
    r = x - means[y]  # (N, R)
    k = counts[y] / np.maximum(counts[y] - 1, 1)  # (N,)
    q = np.linalg.inv((1 - a) * scatter / max(1, n - 2) + a * scale * np.eye(len(scatter)))  # before the downdate
    c = (1 - a) * k / max(1, n - 2)  # each item's downdate: Sigma_-i = Sigma - c_i r_i r_i^T
    g = r @ q  # (N, R)
    s = (g * r).sum(1)  # r_i^T Q r_i
    mq = means @ q
    xq = x @ q
    quad = (xq * x).sum(1)[:, None] - 2 * xq @ means.T + (mq * means).sum(1)[None]  # (N, C): v^T Q v, v = x - m
    cross = (g * x).sum(1)[:, None] - g @ means.T  # (N, C): r^T Q v
    own = np.arange(n), y
    quad[own], cross[own] = k ** 2 * s, k * s  # v = x_i - (its class mean without it) = k r_i
    d = quad + c[:, None] * cross ** 2 / (1 - c * s)[:, None]
    d[:, counts == 0] = np.inf
    d[own] = np.where(counts[y] > 1, d[own], np.inf)
    return (-d.min(1)).astype(np.float32)


def mahalanobis_pp(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Minus the smallest Mahalanobis distance of the L2-normalised rows of `x` to a class mean."""
    x = _l2(x.astype(np.float32))
    with torch.autocast("cpu", enabled=False):  # in torch, not numpy: see _knn
        xt, mt, pt = torch.from_numpy(x), torch.from_numpy(means), torch.from_numpy(precision)
        xp = xt @ pt  # (N, R)
        d = (xp * xt).sum(1, keepdim=True) - 2 * xp @ mt.T + ((mt @ pt) * mt).sum(1)[None]  # (N, C)
    return -d.min(1).values.numpy()


LOCO_MAX_CLASSES = 20  # classes held out in turn for the leave-one-class-out estimate (a seeded sample beyond)


def leave_class_out(x: np.ndarray, targets: np.ndarray, n_classes: int, *, keep: float, valid_x: np.ndarray,
                    valid_targets: np.ndarray, valid_correct: np.ndarray, seed: int = 0) -> dict | None:
    """What the pretrained_mahalanobis flag does to classes it never saw, estimated without unknown examples: each
    known class in turn is held out, the statistics fitted on the other classes' training items `x` (reference
    features, class indices), the threshold chosen as the shipped one is (`keep` of those items' leave-one-out
    scores), and the held-out class's training and validation items scored: `caught` is the share of them rejected
    (they stand in for look-alike unknowns: same source, another class). `kept` is the share of the other classes'
    correctly classified validation items (`valid_correct`) accepted; they choose nothing here. Both are pooled
    over the held-out classes. Some known classes are unlike all the others and nearly all caught, others pass as
    one of their neighbours: `caught_lookalike`, the mean over the half of the classes caught least, is the share
    for look-alikes (the suite's near classes, chosen to resemble known ones, are caught about that often:
    bench/BENCHMARKS.md). None with fewer than 3 classes with items (one class left is no classifier)."""
    present = np.flatnonzero(np.bincount(targets, minlength=n_classes) > 1)
    if len(present) < 3:
        return None
    held = present if len(present) <= LOCO_MAX_CLASSES else \
        np.sort(np.random.default_rng(seed).choice(present, LOCO_MAX_CLASSES, replace=False))
    caught = held_n = kept = kept_n = 0
    per_class = []
    for c in held:
        others = targets != c
        remap = np.cumsum(np.arange(n_classes) != c) - 1  # class indices without c
        loo = loo_reference_scores(x[others], remap[targets[others]], n_classes - 1)
        threshold = threshold_for_share(loo, keep)
        means, precision = mahalanobis_pp_fit(x[others], remap[targets[others]], n_classes - 1)
        out = np.concatenate([x[~others], valid_x[valid_targets == c]])
        rejected = int((mahalanobis_pp(out, means, precision) < threshold).sum())
        caught, held_n = caught + rejected, held_n + len(out)
        per_class.append(rejected / len(out))
        ok = (valid_targets != c) & valid_correct
        kept += int((mahalanobis_pp(valid_x[ok], means, precision) >= threshold).sum())
        kept_n += int(ok.sum())
    return {"caught": caught / held_n, "kept": kept / kept_n if kept_n else None,
            # the half of the held-out classes most like the others: the look-alikes
            "caught_lookalike": float(np.mean(sorted(per_class)[:(len(per_class) + 1) // 2])),
            "caught_per_class": per_class,
            "classes_held_out": len(held),
            "items_held_out": held_n, "valid_items_kept_of": kept_n,
            "how": "leave-one-class-out: each known class in turn scored as unknown against the others"}


def unknown_estimate_line(report: dict) -> str | None:
    """What the unknown flag should do, in words, from a calibration report's leave-one-class-out estimate (None
    where there is none: a score other than pretrained_mahalanobis, fewer than 3 classes, or an older run)."""
    loco = report.get("leave_class_out")
    if not loco:
        return None
    kept = f" and keeps about {loco['kept']:.0%} of correct items" if loco.get("kept") is not None else ""
    return (f"the unknown flag should catch about {loco['caught_lookalike']:.0%} of look-alike unknowns{kept} "
            f"({loco['caught']:.0%} of unknowns of the known classes' kind; each of {loco['classes_held_out']} known "
            f"classes held out in turn as the unknown)")


def crossfit_reference_scores(ref_features: np.ndarray, targets: np.ndarray, n_classes: int, *,
                              folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold pretrained_mahalanobis scores of known items: each fold scored by statistics of the others.
    The reference body never trained on these items, so they are fair stand-ins for new known inputs: the
    threshold is chosen from all the training items, not the few that validation holds. Folds are of items (a
    multi-label item's classes all in one fold)."""
    fold = np.random.default_rng(seed).permutation(len(targets)) % folds
    out = np.empty(len(targets), np.float32)
    for f in range(folds):
        means, precision = mahalanobis_pp_fit(ref_features[fold != f], targets[fold != f], n_classes)
        out[fold == f] = mahalanobis_pp(ref_features[fold == f], means, precision)
    return out


def _l2(x: np.ndarray) -> np.ndarray:
    # not np.linalg.norm: it calls OpenBLAS, whose threads then spin and slow the next forward pass (see _knn)
    return x / np.clip(np.sqrt(np.square(x).sum(axis=1, keepdims=True)), 1e-12, None)


def _knn(features: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Minus the distance to the k-th nearest training feature (Sun et al. 2022), both L2-normalised."""
    # the product in torch, not numpy: numpy's OpenBLAS threads keep spinning after a call and took the cores from
    # the next batch's forward pass (itfits predict: 413 instead of about 670 images/s on 2 cores)
    with torch.autocast("cpu", enabled=False):  # fp32 even where prediction runs under bf16 autocast
        sims = (torch.from_numpy(_l2(features.astype(np.float32))) @ torch.from_numpy(bank.astype(np.float32)).T).numpy()
    k = min(KNN_K, sims.shape[1])
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return -np.sqrt(np.clip(2 - 2 * kth, 0, None))


def compute_scores(logits: np.ndarray, features: np.ndarray | None, *, temperature: float,
                   stats: UnknownStats | None, names=SCORES) -> dict[str, np.ndarray]:
    """Each named score per row; higher = more likely a known class."""
    if stats is not None and features is not None and features.shape[1] != stats.n_features:
        # e.g. a bundle's bare model (no reference body) run where its scoring_model belongs
        raise ValueError(f"features have {features.shape[1]} columns; these statistics need {stats.n_features}")
    out = {}
    for name in names:
        if name == "max_softmax":
            out[name] = softmax(logits, temperature).max(1)
        elif name == "max_logit":
            out[name] = logits.max(1)
        elif name == "energy":  # negative free energy, T * logsumexp(logits / T)
            z = logits / temperature
            m = z.max(1)
            out[name] = temperature * (m + np.log(np.exp(z - m[:, None]).sum(1)))
        elif name == "knn":
            out[name] = _knn(features[:, :stats.head_dim], stats.bank)
        elif name == "mahalanobis":  # minus the smallest class-conditional Mahalanobis distance (Lee et al. 2018)
            d = features[:, None, :stats.head_dim].astype(np.float32) - stats.means[None]
            out[name] = -np.einsum("ncd,de,nce->nc", d, stats.precision, d).min(1)
        elif name == "pretrained_mahalanobis":
            if stats is None or not stats.ref_dim:
                raise ItfitsError("this model has no pretrained reference body for the pretrained_mahalanobis score "
                                  "(a table model, or one made by an older itfits); use --score combined, "
                                  "mahalanobis or max_softmax")
            out[name] = mahalanobis_pp(features[:, features.shape[1] - stats.ref_dim:], stats.ref_means,
                                       stats.ref_precision)
        elif name == "combined":  # the sum of the standardised parts
            if not len(stats.combine):
                raise ItfitsError("this model has no statistics for the combined score (made by an older itfits); "
                                  "use --score knn or max_softmax, or train it again")
            out[name] = ((stats.combined_parts(logits, features, temperature) - stats.combine[:, 0])
                         / stats.combine[:, 1]).sum(1)
        else:
            raise ItfitsError(f"'{name}' is not an unknown score; choices: {', '.join(SCORES)}")
    return out


def choose_threshold(scores: np.ndarray, correct: np.ndarray, keep: float) -> float:
    """The threshold that accepts a share `keep` of the correctly classified items."""
    return threshold_for_share(scores[correct] if correct.any() else scores, keep)


@dataclass
class Calibration:
    """What a bundle needs to turn logits (+ features) into calibrated probabilities and unknown flags."""
    temperature: float = 1.0
    score: str = DEFAULT_SCORE
    threshold: float = float("-inf")
    keep: float = 0.95
    thresholds: list[float] | None = None  # multi-label: one per class on its sigmoid; None: single-label (softmax)
    stats: UnknownStats | None = field(default=None, repr=False)

    def json(self) -> dict:
        out = {"temperature": self.temperature, "score": self.score, "threshold": self.threshold, "keep": self.keep}
        return out if self.thresholds is None else {**out, "thresholds": list(self.thresholds)}

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    @property
    def scores(self) -> tuple[str, ...]:
        """The scores this calibration can compute (a bundle saved without unknown statistics: the logit ones)."""
        return self.stats.scores if self.stats is not None else LOGIT_SCORES

    def apply(self, logits: np.ndarray, features: np.ndarray | None, *, threshold: float | None = None):
        """(calibrated probabilities, score, unknown flag) per row. Multi-label: probabilities are sigmoids, and a
        row with no class above its threshold is unknown too (none of the classes)."""
        score = compute_scores(logits, features, temperature=self.temperature, stats=self.stats, names=[self.score])[self.score]
        t = self.threshold if threshold is None else threshold
        unknown = ~(score >= t)  # a NaN score is no reason to trust a row
        if not self.multi_label:
            return softmax(logits, self.temperature), score, unknown
        probs = sigmoid(logits, self.temperature)
        return probs, score, unknown | ~(probs >= np.asarray(self.thresholds)).any(1)


def guarded_temperature(logits: np.ndarray, targets: np.ndarray) -> tuple[float, dict]:
    """(T, report): the temperature fitted on validation, or T = 1 where it would not help there: with no
    validation mistakes (the NLL keeps falling as T -> 0, no evidence to recalibrate on) or where the fitted T
    worsens validation ECE or NLL (seen on small sets: ECE 0.111 -> 0.123). The report has NLL and ECE before and
    after, the fitted T, and `temperature_note` saying why T = 1 where it is kept."""
    fitted = fit_temperature(logits, targets) if not (logits.argmax(1) == targets).all() else None
    nll_1, ece_1 = nll(logits, targets), expected_calibration_error(softmax(logits), targets)
    if fitted is None:
        return 1.0, {"temperature": 1.0, "fitted_temperature": None,
                     "temperature_note": "kept at 1: no validation mistakes to calibrate on",
                     "valid_nll": {"before": nll_1, "after": nll_1}, "valid_ece": {"before": ece_1, "after": ece_1}}
    nll_t, ece_t = nll(logits, targets, fitted), expected_calibration_error(softmax(logits, fitted), targets)
    worse = [f"{name} {before:.3f} -> {after:.3f}" for name, before, after in
             (("ECE", ece_1, ece_t), ("NLL", nll_1, nll_t)) if after > before + 1e-9]
    if worse:
        note = f"kept at 1: the fitted temperature {fitted:.2f} would worsen validation {' and '.join(worse)}"
        return 1.0, {"temperature": 1.0, "fitted_temperature": fitted, "temperature_note": note,
                     "valid_nll": {"before": nll_1, "after": nll_1}, "valid_ece": {"before": ece_1, "after": ece_1}}
    return fitted, {"temperature": fitted, "fitted_temperature": fitted,
                    "valid_nll": {"before": nll_1, "after": nll_t}, "valid_ece": {"before": ece_1, "after": ece_t}}


def calibrate(valid_logits: np.ndarray, valid_targets: np.ndarray, valid_features: np.ndarray, stats: UnknownStats, *,
              keep: float = 0.95, score: str | None = None, threshold: float | None = None, unknown_logits: np.ndarray | None = None,
              unknown_features: np.ndarray | None = None, default_score: str = DEFAULT_SCORE,
              known_scores: dict[str, np.ndarray] | None = None) -> tuple[Calibration, dict]:
    """Fit the temperature, choose the score (given, else best AUROC on unknown examples, else the default)
    and the threshold (given, else the one accepting `keep` of the known items: for a score in `known_scores`
    (out-of-fold scores of the training items, crossfit_reference_scores) those and the validation items, for the
    others the correctly classified validation items). Returns the calibration and a report of the figures
    behind it."""
    if not 0 < keep <= 1:
        raise ItfitsError(f"--keep must be in (0, 1], got {keep}")
    if score is not None and score not in SCORES:
        raise ItfitsError(f"'{score}' is not an unknown score; choices: {', '.join(SCORES)}")
    correct = valid_logits.argmax(1) == valid_targets
    t, report = guarded_temperature(valid_logits, valid_targets)
    score, threshold, stats = choose_unknown_rule(valid_logits, valid_features, stats, t, correct, report, keep=keep,
                                                  score=score, threshold=threshold, unknown_logits=unknown_logits,
                                                  unknown_features=unknown_features, default_score=default_score,
                                                  known_scores=known_scores)
    return Calibration(temperature=t, score=score, threshold=threshold, keep=keep, stats=stats), report


def choose_unknown_rule(valid_logits: np.ndarray, valid_features: np.ndarray, stats: UnknownStats, t: float,
                        correct: np.ndarray, report: dict, *, keep: float, score: str | None, threshold: float | None,
                        unknown_logits: np.ndarray | None, unknown_features: np.ndarray | None, default_score: str,
                        known_scores: dict[str, np.ndarray] | None) -> tuple[str, float, UnknownStats]:
    """The unknown score and its threshold as `calibrate` chooses them, at temperature `t`, with `correct` the
    validation items whose share `keep` the threshold accepts; adds its figures to `report`. Returns (score,
    threshold, the statistics with the combined score's standardisation)."""
    stats = stats.with_combine(valid_logits, valid_features, t)
    if score is not None and score not in stats.scores:
        compute_scores(valid_logits, valid_features, temperature=t, stats=stats, names=[score])  # its error
    valid_scores = compute_scores(valid_logits, valid_features, temperature=t, stats=stats, names=stats.scores)
    if unknown_logits is not None and len(unknown_logits):
        unk = compute_scores(unknown_logits, unknown_features, temperature=t, stats=stats, names=stats.scores)
        report["unknown_examples"] = {name: {"auroc": auroc(valid_scores[name], unk[name]),
                                             "fpr95": fpr_at_tpr(valid_scores[name], unk[name])}
                                      for name in stats.scores}
        if score is None:
            score = max(stats.scores, key=lambda n: report["unknown_examples"][n]["auroc"])
            report["score_chosen_by"] = "best AUROC on the --unknown examples"
    if score is None:
        score, report["score_chosen_by"] = default_score, "default"
    report.setdefault("score_chosen_by", "--score")
    known_scores = known_scores or {}
    if threshold is None and score in known_scores:  # many more items than validation's 12-48 on small data
        pool = np.concatenate([known_scores[score], valid_scores[score]])
        threshold = threshold_for_share(pool, keep)
        report["threshold_chosen_on"] = f"{len(pool)} known items (training items left out in turn, and validation)"
    elif threshold is None:
        threshold = choose_threshold(valid_scores[score], correct, keep)
        report["threshold_chosen_on"] = f"{int(correct.sum())} correctly classified validation items"
    accepted = valid_scores[score] >= threshold
    report.update(score=score, threshold=threshold, keep=keep,
                  valid_correct_accepted=float(accepted[correct].mean()) if correct.any() else None)
    if "unknown_examples" in report:
        report["unknown_examples_accepted"] = float((unk[score] >= threshold).mean())
    return score, threshold, stats
