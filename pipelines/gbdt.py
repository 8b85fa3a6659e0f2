"""Gradient-boosted trees for tables (LightGBM), beside fastai's TabularModel: the same encoded rows
(TabularPreprocessing.encode: category codes with 0 for missing or unseen, numbers with missing values filled and
`_na` flags), trained with early stopping on the validation rows.

Why LightGBM (bench/BENCHMARKS.md, "Gradient-boosted trees"): a 3.5 MB wheel (XGBoost's is 132 MB with its
CUDA build, 5.6 MB as the separate xgboost-cpu), native splits on category codes and on missing values, fast on
2 cores at a thousand rows, and a plain-text model format that its own `Booster(model_str=...)` reads back with
no pickle. The bundle keeps that text as `model.lgb.txt`, its SHA-256 in itfits.json's `files` (bundle.py
checks it).

Outputs as the network's: logits (N, n_out): a multiclass model's raw scores, a binary model's [0, s] (so
softmax gives sigmoid(s)), a regression's (N, 1) prediction of the standardised target. Features for the
unknown scores: the encoded row itself, numbers (standardised) and categories one-hot, so a row unlike the
training rows scores low whatever the trees learnt (`row_features`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from .errors import ItfitsError

MODEL_FILE = "model.lgb.txt"
# Chosen on bench/table_suite.py (7 tables, 5 seeds; bench/BENCHMARKS.md "Gradient-boosted trees"): boosting at
# a rate of 0.05 until the validation loss has not improved for PATIENCE rounds, the best round's trees kept.
PARAMS = {"learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 20, "min_data_per_group": 20,
          "max_cat_to_onehot": 8, "cat_smooth": 10, "feature_pre_filter": False, "verbosity": -1,
          "deterministic": True, "force_col_wise": True}
MAX_ROUNDS, PATIENCE = 2000, 50
ONE_HOT_MAX = 32  # categories one-hot in the unknown score's features; a column with more: its code's frequency


@dataclass(frozen=True)
class GBDTSpec:
    """What rebuilds the model around its LightGBM text; itfits.json's `model`."""
    n_cat: int  # category-code columns first (categorical columns, then _na flags), as TabularPreprocessing.encode
    n_cont: int
    n_out: int  # classes, or 1 for regression
    cat_sizes: tuple[int, ...]  # vocabulary size of each code column (the unknown score's one-hot features)
    rounds: int  # trees per output kept
    kind: str = "gbdt"
    library: str = "lightgbm"
    file: str = MODEL_FILE

    def json(self) -> dict:
        return {**asdict(self), "cat_sizes": list(self.cat_sizes)}

    @classmethod
    def from_json(cls, d: dict) -> "GBDTSpec":
        return cls(**{**d, "cat_sizes": tuple(d["cat_sizes"])})

    @property
    def binary(self) -> bool:
        return self.n_out == 2


def matrix(x_cat: np.ndarray, x_cont: np.ndarray) -> np.ndarray:
    """(N, n_cat + n_cont) float64: the codes, then the numbers; LightGBM reads the first n_cat as categories."""
    return np.hstack([x_cat.astype(np.float64), x_cont.astype(np.float64)])


def row_features(x_cat: np.ndarray, x_cont: np.ndarray, cat_sizes) -> np.ndarray:
    """The unknown scores' features of encoded rows: the standardised numbers, then each code column one-hot
    (a column of more than ONE_HOT_MAX codes: its code, scaled to [0, 1]). float32 (N, F)."""
    parts = [x_cont.astype(np.float32)]
    for j, size in enumerate(cat_sizes):
        codes = np.clip(x_cat[:, j], 0, size - 1)
        parts.append(np.eye(size, dtype=np.float32)[codes] if size <= ONE_HOT_MAX else
                     (codes / max(size - 1, 1)).astype(np.float32)[:, None])
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(x_cat), 0), np.float32)


class GBDTModel(nn.Module):
    """A LightGBM booster where the stages expect the tabular network: `model(x_cat, x_cont)` gives logits. No
    parameters; the booster lives in `bundle_files()` / `load_files()` (LightGBM's text format)."""

    def __init__(self, spec: GBDTSpec, booster=None):
        super().__init__()
        self.spec, self.booster = spec, booster

    def forward(self, x_cat: torch.Tensor, x_cont: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.logits(x_cat.numpy(), x_cont.numpy()))

    def logits(self, x_cat: np.ndarray, x_cont: np.ndarray) -> np.ndarray:
        if not len(x_cat):
            return np.zeros((0, self.spec.n_out), np.float32)
        raw = np.asarray(self.booster.predict(matrix(x_cat, x_cont), raw_score=True), dtype=np.float32)
        if self.spec.binary:  # one score s: softmax([0, s]) is sigmoid(s)
            return np.stack([np.zeros_like(raw), raw], axis=1)
        return raw.reshape(len(x_cat), -1)

    def outputs(self, x_cat: np.ndarray, x_cont: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, n_out), unknown-score features (N, F)) of encoded rows."""
        return self.logits(x_cat, x_cont), row_features(x_cat, x_cont, self.spec.cat_sizes)

    def text(self) -> str:
        return self.booster.model_to_string(num_iteration=-1)

    def bundle_files(self) -> dict[str, bytes]:
        return {self.spec.file: self.text().encode("utf-8")}

    def load_files(self, files: dict[str, bytes]) -> None:
        """The booster from the bundle's MODEL_FILE (its SHA-256 already checked against the spec)."""
        import lightgbm
        try:
            self.booster = lightgbm.Booster(model_str=files[self.spec.file].decode("utf-8"))
        except (lightgbm.basic.LightGBMError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.spec.file} is not a LightGBM model ({str(e)[:200]})") from e
        n_features = self.booster.num_feature()
        if n_features != self.spec.n_cat + self.spec.n_cont:
            raise ValueError(f"{self.spec.file} takes {n_features} columns; itfits.json describes "
                             f"{self.spec.n_cat + self.spec.n_cont}")


@dataclass(frozen=True)
class GBDTFit:
    model: GBDTModel
    history: pl.DataFrame  # one row per boosting round: epoch (round), train_loss, valid_loss
    resolved: dict  # run.json's record of what it trained
    seconds: float


def train_gbdt(data, *, seed: int, threads: int | None = None) -> GBDTFit:
    """LightGBM on `data` (tabular.TabularData): the training rows boosted until the validation loss (multi/binary
    log-loss, or L2 of the standardised target) has not fallen for PATIENCE rounds; the best round's trees kept."""
    import lightgbm
    t0 = time.perf_counter()
    prep = data.prep
    classify = prep.task == "classification"
    n_out = len(prep.classes) if classify else 1
    objective = ("binary" if n_out == 2 else "multiclass") if classify else "regression"
    (t_cat, t_cont, t_y), (v_cat, v_cont, v_y) = data.part(False), data.part(True)
    n_cat = t_cat.shape[1]
    params = {**PARAMS, "objective": objective, "seed": seed, "num_threads": threads or torch.get_num_threads(),
              # a table of 40 training rows still gets splits: never more than a tenth of them a leaf
              "min_data_in_leaf": max(2, min(PARAMS["min_data_in_leaf"], len(t_y) // 10)),
              **({"num_class": n_out} if objective == "multiclass" else {})}
    params["min_data_per_group"] = params["min_data_in_leaf"]
    cats = list(range(n_cat))
    train = lightgbm.Dataset(matrix(t_cat, t_cont), t_y.astype(np.float64), categorical_feature=cats,
                             free_raw_data=False)
    valid = lightgbm.Dataset(matrix(v_cat, v_cont), v_y.astype(np.float64), categorical_feature=cats, reference=train)
    evals: dict = {}
    try:
        booster = lightgbm.train(params, train, num_boost_round=MAX_ROUNDS, valid_sets=[train, valid],
                                 valid_names=["train", "valid"],
                                 callbacks=[lightgbm.early_stopping(PATIENCE, verbose=False),
                                            lightgbm.record_evaluation(evals)])
    except lightgbm.basic.LightGBMError as e:
        raise ItfitsError(f"LightGBM could not train on this table: {e}") from e
    best = booster.best_iteration or booster.current_iteration()
    text = booster.model_to_string(num_iteration=best)
    booster = lightgbm.Booster(model_str=text)  # the kept rounds alone, exactly as the bundle holds them
    metric = next(iter(evals["valid"]))
    history = pl.DataFrame({"epoch": np.arange(len(evals["valid"][metric])), "train_loss": evals["train"][metric],
                            "valid_loss": evals["valid"][metric]})
    spec = GBDTSpec(n_cat=n_cat, n_cont=t_cont.shape[1], n_out=n_out, cat_sizes=tuple(prep.cat_sizes), rounds=best)
    resolved = {"library": f"lightgbm {lightgbm.__version__}", "objective": objective, "rounds": best,
                "max_rounds": MAX_ROUNDS, "patience": PATIENCE, "params": {k: params[k] for k in (
                    "learning_rate", "num_leaves", "min_data_in_leaf")}}
    return GBDTFit(model=GBDTModel(spec, booster).eval(), history=history, resolved=resolved,
                   seconds=round(time.perf_counter() - t0, 2))
