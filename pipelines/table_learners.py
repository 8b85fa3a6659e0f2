"""The learners of tables, one entry each (as modalities are): how one kind of model trains on a TabularData, what
it computes for encoded rows (logits and the unknown scores' features), and how it comes back from a bundle.
`--model auto` trains every entry on the same split and keeps the better on validation (table_fit.py), a regression
also weighing the blend of both (`BLEND`, the mean of their predictions; `--model blend` keeps it for either task);
prediction asks the entry named by the bundle's itfits.json `model.kind` (bundles before this registry: "nn").

Importing this module imports neither fastai nor LightGBM: each entry imports its library when it trains or
rebuilds a model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import polars as pl

import torch

from .errors import ItfitsError, did_you_mean
from .gbdt import GBDTModel, GBDTSpec
from .metrics import softmax
from .tabular import TabularModelSpec, create_tabular_model, tabular_outputs
from .unknown import TABLE_DEFAULT_SCORE

AUTO = "auto"
BLEND_NAME = "blend"


@dataclass(frozen=True)
class TableFit:
    """One learner's training on a run's table."""
    kind: str  # its TableLearner's name
    model: object  # a torch Module in eval mode: fastai's TabularModel, or gbdt.GBDTModel
    history: pl.DataFrame  # one row per epoch (nn) or boosting round (gbdt): epoch, train_loss, valid_loss, ...
    resolved: dict  # what it chose (lr, epochs, rounds, ...), for run.json
    model_json: dict  # itfits.json's `model`: what rebuilds it
    seconds: float
    files: dict[str, bytes] = field(default_factory=dict)  # bundle files beside model.safetensors (gbdt: its text)
    learn: object = None  # the fastai Learner that trained it (nn), for itfits.fit's Run.learn; None for gbdt


@dataclass(frozen=True)
class TableLearner:
    name: str  # --model NAME; itfits.json's model.kind
    describe: str  # the model, for people
    train: Callable  # (data: TabularData, config: FitConfig, run: Path, log) -> TableFit
    outputs: Callable  # (model, x_cat, x_cont) -> (logits (N, n_out), features (N, F)), float32 numpy
    rebuild: Callable  # (itfits.json's model) -> the model, its weights or files loaded after
    problem: Callable  # (itfits.json's model) -> what makes it unusable, or None
    default_score: str  # the unknown score when neither --score nor --unknown chooses one


def _train_nn(data, config, run, log) -> TableFit:
    from .table_fit import train_nn  # fastai: only where a network trains
    return train_nn(data, config, run, log)


def _train_gbdt(data, config, run, log) -> TableFit:
    from .gbdt import train_gbdt
    fit = train_gbdt(data, seed=config.seed)
    return TableFit(kind="gbdt", model=fit.model, history=fit.history, resolved=fit.resolved,
                    model_json=fit.model.spec.json(), seconds=fit.seconds, files=fit.model.bundle_files())


def _nn_problem(spec: dict) -> str | None:
    return None if spec.get("kind", "nn") == "nn" else f"model.kind {spec.get('kind')!r} is not nn"


def _gbdt_problem(spec: dict) -> str | None:
    need = {"n_cat", "n_cont", "n_out", "cat_sizes", "rounds", "file"}
    if not need <= set(spec):
        return f"a gbdt model needs {', '.join(sorted(need - set(spec)))} in itfits.json's model"
    if spec.get("library") != "lightgbm":
        return f"model.library must be lightgbm, got {spec.get('library')!r}"
    if not (isinstance(spec["cat_sizes"], list) and len(spec["cat_sizes"]) == spec["n_cat"]
            and all(isinstance(n, int) and n > 0 for n in spec["cat_sizes"])):
        return "model.cat_sizes must list a positive vocabulary size for each of its n_cat columns"
    return None


LEARNERS: dict[str, TableLearner] = {
    "nn": TableLearner(
        name="nn", describe="fastai's TabularModel (embeddings and an MLP)", train=_train_nn,
        outputs=lambda model, x_cat, x_cont: tabular_outputs(model, x_cat, x_cont),
        rebuild=lambda spec: create_tabular_model(TabularModelSpec.from_json(spec)), problem=_nn_problem,
        # Mahalanobis on the MLP's features caught each held-out penguin species best (README "Tabular")
        default_score=TABLE_DEFAULT_SCORE),
    "gbdt": TableLearner(
        name="gbdt", describe="gradient-boosted trees (LightGBM)", train=_train_gbdt,
        outputs=lambda model, x_cat, x_cont: model.outputs(x_cat, x_cont),
        rebuild=lambda spec: GBDTModel(GBDTSpec.from_json(spec)), problem=_gbdt_problem,
        default_score=TABLE_DEFAULT_SCORE),
}


class BlendModel(torch.nn.Module):
    """The network and the trees as one model: the mean of their predictions (classification: of their
    probabilities, as log-probabilities, so calibration and the predictions table treat them as logits). The unknown
    scores' features are the trees' (the encoded row), as the trees' own model has them."""

    def __init__(self, network: torch.nn.Module, trees: GBDTModel):
        super().__init__()
        self.network, self.trees = network, trees  # state dict: network.* (the trees live in their text file)

    def outputs(self, x_cat: np.ndarray, x_cont: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, _ = tabular_outputs(self.network, x_cat, x_cont)
        b, feats = self.trees.outputs(x_cat, x_cont)
        if self.trees.spec.n_out == 1:  # regression: both predict the standardised target
            return (a + b) / 2, feats
        probs = (softmax(a.astype(np.float64)) + softmax(b.astype(np.float64))) / 2
        return np.log(np.maximum(probs, 1e-12)).astype(np.float32), feats

    def load_files(self, files: dict[str, bytes]) -> None:
        self.trees.load_files(files)


def blend_fit(network: TableFit, trees: TableFit) -> TableFit:
    """The blend of two fits on one split; its history (the report's curves) is the network's."""
    model = BlendModel(network.model, trees.model).eval()
    return TableFit(kind=BLEND_NAME, model=model, history=network.history,
                    resolved={"members": {"nn": network.resolved, "gbdt": trees.resolved}, "weights": [0.5, 0.5]},
                    model_json={"kind": BLEND_NAME, "members": {"nn": network.model_json, "gbdt": trees.model_json}},
                    seconds=round(network.seconds + trees.seconds, 2), files=trees.files)


def _blend_problem(spec: dict) -> str | None:
    members = spec.get("members")
    if not isinstance(members, dict) or set(members) != {"nn", "gbdt"} or not all(
            isinstance(m, dict) for m in members.values()):
        return "a blend model needs members.nn and members.gbdt, each a JSON object"
    return LEARNERS["nn"].problem(members["nn"]) or LEARNERS["gbdt"].problem(members["gbdt"])


def _rebuild_blend(spec: dict) -> BlendModel:
    members = spec["members"]
    return BlendModel(LEARNERS["nn"].rebuild(members["nn"]), LEARNERS["gbdt"].rebuild(members["gbdt"]))


# Not a learner of its own: table_fit makes it from the nn and gbdt fits of one split (blend_fit). Under auto, a
# regression weighs it beside them: on the table suite it beat both on both regression tables and lost to auto on
# the classification mean (bench/BENCHMARKS.md, "A blend of the two learners").
BLEND = TableLearner(name=BLEND_NAME, describe="the mean of fastai's TabularModel and LightGBM's trees", train=None,
                     outputs=lambda model, x_cat, x_cont: model.outputs(x_cat, x_cont), rebuild=_rebuild_blend,
                     problem=_blend_problem, default_score=TABLE_DEFAULT_SCORE)
KINDS: dict[str, TableLearner] = {**LEARNERS, BLEND_NAME: BLEND}  # what a bundle's model.kind may name
MODEL_CHOICES = (AUTO, *KINDS)


def check_model(name: str) -> None:
    if name not in MODEL_CHOICES:
        raise ItfitsError(f"--model {name!r} is not one of {', '.join(MODEL_CHOICES)};"
                          f"{did_you_mean(name, MODEL_CHOICES)} auto trains each and keeps the better on validation")


def learners_for(name: str) -> list[TableLearner]:
    """The learners `--model NAME` trains: every one for auto and blend."""
    check_model(name)
    return list(LEARNERS.values()) if name in (AUTO, BLEND_NAME) else [LEARNERS[name]]


def weighs_blend(name: str, task: str) -> bool:
    """Whether `--model NAME` on a table of `task` makes the blend of its two fits a candidate."""
    return name == BLEND_NAME or (name == AUTO and task == "regression")


def learner_of(model_json: dict) -> TableLearner:
    """The learner of a bundle's itfits.json `model` (no kind: a bundle from before the registry, fastai's model)."""
    kind = model_json.get("kind", "nn")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ItfitsError(f"model.kind {kind!r} is not one of {', '.join(KINDS)}")
    return KINDS[kind]


def valid_scores(learner: TableLearner, fit: TableFit, data) -> dict:
    """A fit's outputs and figures on the validation rows: logits, features; accuracy and log-loss
    (classification) or RMSE in the target's units (regression); `rank`, what `choose` compares (higher is
    better), and `rank_by`, its words."""
    v_cat, v_cont, v_y = data.part(True)
    logits, feats = learner.outputs(fit.model, v_cat, v_cont)
    if data.prep.task != "classification":
        rmse = float(np.sqrt(np.mean((logits[:, 0].astype(np.float64) - v_y) ** 2))) * data.prep.target_std
        return {"logits": logits, "features": feats, "valid_rmse": rmse, "rank": (-rmse,),
                "rank_by": "the lower validation RMSE"}
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    accuracy, nll = float((logits.argmax(1) == v_y).mean()), float(-logp[np.arange(len(v_y)), v_y].mean())
    return {"logits": logits, "features": feats, "valid_accuracy": accuracy, "valid_nll": nll,
            "rank": (accuracy, -nll), "rank_by": "the higher validation accuracy, then the lower log-loss"}


def choose(scores: dict[str, dict], model: str = AUTO) -> tuple[str, str]:
    """(the learner kept, why): the one `--model` names, else (auto) the highest `rank` of `valid_scores`."""
    if model != AUTO:
        return model, "--model named it"
    best = max(scores, key=lambda k: scores[k]["rank"])
    return best, scores[best]["rank_by"]
