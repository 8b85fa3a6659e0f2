"""Unknown handling: temperature calibration, unknown scores, threshold choice from data, and the metrics.

Every score is "higher = more likely one of the known classes". The features a model gives for the scores are
[the head's penultimate features | the pooled input of the body's last stage] (backbones.forward_features;
tabular models give the first part only). What a score needs besides the logits (banks of training features for
kNN, class means and a precision matrix for Mahalanobis, the standardisation of the combined score) is kept in
`UnknownStats` and saved into the bundle's safetensors file; the JSON keeps the scalars.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import ItfitsError

SCORES = ("max_softmax", "max_logit", "energy", "knn", "mahalanobis", "combined")
LOGIT_SCORES = SCORES[:3]  # the scores that need no training statistics
# best AUROC, and the most correct items kept at the plain 0.95 rule's unknown acceptance, on held-out classes in
# bench/unknown_scores.py (see bench/BENCHMARKS.md)
DEFAULT_SCORE = "combined"
# tables: Mahalanobis on the MLP's features caught each held-out penguin species best (AUROC 0.93-1.0, combined
# 0.79-0.94: max softmax, one of its parts, is near chance there; README "Tabular")
TABLE_DEFAULT_SCORE = "mahalanobis"
KNN_K = 5
KNN_BANK_MAX = 2048  # training features kept for kNN (fp16): at most 2048 x D, a few MB for D = 512-1280


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on held-out data (Guo et al. 2017)."""
    x, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(targets, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits, temperature)[np.arange(len(targets)), targets]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf, correct = probs.max(1), probs.argmax(1) == targets
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(correct[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


@dataclass
class UnknownStats:
    """Feature statistics of the training set that the feature-space scores need (D = head feature size, M =
    size of the body's pooled stage features, 0 for tabular models)."""
    bank: np.ndarray  # (N, D) L2-normalised head features of training items, for kNN
    means: np.ndarray  # (C, D) class means, for Mahalanobis
    precision: np.ndarray  # (D, D) inverse of the shared within-class covariance
    stage_bank: np.ndarray  # (N, M) L2-normalised stage features of the same items, for the combined score
    combine: np.ndarray  # (K, 2) mean and std on validation items of each part of the combined score

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray, n_classes: int, *, head_dim: int,
            seed: int = 0) -> "UnknownStats":
        """From training features; `head_dim`: how many of the feature columns are the head's (the rest: stage)."""
        stage = features[:, head_dim:].astype(np.float32)
        feats = features[:, :head_dim].astype(np.float64)
        rng = np.random.default_rng(seed)
        keep = rng.permutation(len(feats))[:KNN_BANK_MAX]
        means = np.stack([feats[targets == c].mean(0) if (targets == c).any() else np.zeros(feats.shape[1])
                          for c in range(n_classes)])
        centred = feats - means[targets]
        cov = centred.T @ centred / max(1, len(feats) - 1)
        cov += np.eye(cov.shape[0]) * (1e-3 * np.trace(cov) / cov.shape[0] + 1e-8)  # shrinkage: D can exceed N
        return cls(bank=_l2(feats[keep]).astype(np.float16), means=means.astype(np.float32),
                   precision=np.linalg.inv(cov).astype(np.float32), stage_bank=_l2(stage[keep]).astype(np.float16),
                   combine=np.zeros((0, 2), np.float32))

    @property
    def scores(self) -> tuple[str, ...]:
        """The scores these statistics serve (bundles from before the combined score lack it)."""
        return SCORES if len(self.combine) else tuple(n for n in SCORES if n != "combined")

    @property
    def head_dim(self) -> int:
        return self.bank.shape[1]

    def combined_parts(self, logits: np.ndarray, features: np.ndarray, temperature: float) -> np.ndarray:
        """(N, K) the parts of the combined score, unstandardised: kNN on head features, kNN on stage features
        (when the model has them) and log calibrated max softmax. Each sees unknowns a different way (distance to
        training items in the classifier's own space, in a more generic mid-level space, and the classifier's
        doubt); on held-out classes their standardised sum beats each alone (bench/BENCHMARKS.md)."""
        parts = [_knn(features[:, :self.head_dim], self.bank)]
        if self.stage_bank.shape[1]:
            parts.append(_knn(features[:, self.head_dim:], self.stage_bank))
        parts.append(np.log(np.clip(softmax(logits, temperature).max(1), 1e-30, None)))
        return np.stack(parts, 1)

    def with_combine(self, logits: np.ndarray, features: np.ndarray, temperature: float) -> "UnknownStats":
        """These statistics, with each part of the combined score standardised on validation items (known,
        unseen in training)."""
        parts = self.combined_parts(logits, features, temperature)
        std = parts.std(0) if len(parts) > 1 else np.ones(parts.shape[1])
        return replace(self, combine=np.stack([parts.mean(0), np.clip(std, 1e-6, None)], 1).astype(np.float32))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"unknown.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.__dict__.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "UnknownStats":
        fields = {k: tensors[f"unknown.{k}"].numpy() for k in ("bank", "means", "precision")}
        # bundles from before the combined score have neither: it is then unavailable, the others work
        fields["stage_bank"] = tensors["unknown.stage_bank"].numpy() if "unknown.stage_bank" in tensors else \
            np.zeros((len(fields["bank"]), 0), np.float16)
        fields["combine"] = tensors["unknown.combine"].numpy() if "unknown.combine" in tensors else np.zeros((0, 2))
        return cls(**fields)


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
        elif name == "combined":  # the sum of the standardised parts
            if not len(stats.combine):
                raise ItfitsError("this model has no statistics for the combined score (made by an older itfits); "
                                  "use --score knn or max_softmax, or train it again")
            out[name] = ((stats.combined_parts(logits, features, temperature) - stats.combine[:, 0])
                         / stats.combine[:, 1]).sum(1)
        else:
            raise ItfitsError(f"'{name}' is not an unknown score; choices: {', '.join(SCORES)}")
    return out


def threshold_for_share(scores: np.ndarray, share: float) -> float:
    """The highest threshold t with at least `share` of `scores` >= t."""
    ordered = np.sort(scores)
    return float(ordered[min(len(ordered) - 1, int(np.floor(len(ordered) * (1 - share) + 1e-9)))])


def choose_threshold(scores: np.ndarray, correct: np.ndarray, keep: float) -> float:
    """The threshold that accepts a share `keep` of the correctly classified items."""
    return threshold_for_share(scores[correct] if correct.any() else scores, keep)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of a known item > score of an unknown item), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata
    ranks = rankdata(np.concatenate([known, unknown]))
    n1, n2 = len(known), len(unknown)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Share of unknown items accepted when the threshold accepts `tpr` of the known items."""
    return float((unknown >= threshold_for_share(known, tpr)).mean())


@dataclass
class Calibration:
    """What a bundle needs to turn logits (+ features) into calibrated probabilities and unknown flags."""
    temperature: float = 1.0
    score: str = DEFAULT_SCORE
    threshold: float = float("-inf")
    keep: float = 0.95
    stats: UnknownStats | None = field(default=None, repr=False)

    def json(self) -> dict:
        return {"temperature": self.temperature, "score": self.score, "threshold": self.threshold, "keep": self.keep}

    @property
    def scores(self) -> tuple[str, ...]:
        """The scores this calibration can compute (a bundle saved without unknown statistics: the logit ones)."""
        return self.stats.scores if self.stats is not None else LOGIT_SCORES

    def apply(self, logits: np.ndarray, features: np.ndarray | None, *, threshold: float | None = None):
        """(calibrated probabilities, score, unknown flag) per row."""
        score = compute_scores(logits, features, temperature=self.temperature, stats=self.stats, names=[self.score])[self.score]
        t = self.threshold if threshold is None else threshold
        return softmax(logits, self.temperature), score, ~(score >= t)  # a NaN score is no reason to trust a row


def calibrate(valid_logits: np.ndarray, valid_targets: np.ndarray, valid_features: np.ndarray, stats: UnknownStats, *,
              keep: float = 0.95, score: str | None = None, threshold: float | None = None, unknown_logits: np.ndarray | None = None,
              unknown_features: np.ndarray | None = None, default_score: str = DEFAULT_SCORE) -> tuple[Calibration, dict]:
    """Fit the temperature, choose the score (given, else best AUROC on unknown examples, else the default)
    and the threshold (given, else the one accepting `keep` of the correct validation items). Returns the calibration and a report of the figures behind it."""
    if not 0 < keep <= 1:
        raise ItfitsError(f"--keep must be in (0, 1], got {keep}")
    if score is not None and score not in SCORES:
        raise ItfitsError(f"'{score}' is not an unknown score; choices: {', '.join(SCORES)}")
    correct = valid_logits.argmax(1) == valid_targets
    # with no validation mistakes the NLL keeps falling as T -> 0: no evidence to recalibrate on, keep T = 1
    t = fit_temperature(valid_logits, valid_targets) if not correct.all() else 1.0
    stats = stats.with_combine(valid_logits, valid_features, t)
    report = {"temperature": t,
              "valid_nll": {"before": nll(valid_logits, valid_targets), "after": nll(valid_logits, valid_targets, t)},
              "valid_ece": {"before": expected_calibration_error(softmax(valid_logits), valid_targets),
                            "after": expected_calibration_error(softmax(valid_logits, t), valid_targets)}}
    valid_scores = compute_scores(valid_logits, valid_features, temperature=t, stats=stats)
    if unknown_logits is not None and len(unknown_logits):
        unk = compute_scores(unknown_logits, unknown_features, temperature=t, stats=stats)
        report["unknown_examples"] = {name: {"auroc": auroc(valid_scores[name], unk[name]),
                                             "fpr95": fpr_at_tpr(valid_scores[name], unk[name])} for name in SCORES}
        if score is None:
            score = max(SCORES, key=lambda n: report["unknown_examples"][n]["auroc"])
            report["score_chosen_by"] = "best AUROC on the --unknown examples"
    if score is None:
        score, report["score_chosen_by"] = default_score, "default"
    report.setdefault("score_chosen_by", "--score")
    if threshold is None:
        threshold = choose_threshold(valid_scores[score], correct, keep)
    accepted = valid_scores[score] >= threshold
    report.update(score=score, threshold=threshold, keep=keep,
                  valid_correct_accepted=float(accepted[correct].mean()) if correct.any() else None)
    if "unknown_examples" in report:
        report["unknown_examples_accepted"] = float((unk[score] >= threshold).mean())
    return Calibration(temperature=t, score=score, threshold=threshold, keep=keep, stats=stats), report
