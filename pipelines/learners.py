"""Learner factories: a backbone from the registry (fastai loss, metrics, body/head parameter split), or
fastai's TabularModel on a preprocessed table."""
from __future__ import annotations

from pathlib import Path

from .backbones import create_backbone


def body_head_split(model):
    """Two parameter groups, body and head: `freeze()` trains the head alone, discriminative lrs follow."""
    from fastai.torch_core import params
    return [params(model[0]), params(model[1])]


def image_learner(dls, arch: str, *, weights: str = "auto", path: Path | str = "."):
    """A fastai Learner for image classification on `dls` with the registered backbone `arch`."""
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    model = create_backbone(arch, num_classes=len(dls.vocab), weights=weights)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=body_head_split,
                   path=Path(path), model_dir="checkpoints")


def _rmse_in_units(inp, targ, *, scale: float):
    import torch
    return torch.sqrt(torch.nn.functional.mse_loss(inp, targ)) * scale


def tabular_learner(dls, spec, *, regression: bool, target_std: float = 1.0, path: Path | str = "."):
    """A fastai Learner with fastai's TabularModel (built from a `TabularModelSpec`), as fastai's tabular_learner
    makes it, on DataLoaders from tabular.tabular_dataloaders (fastai's own needs TabularPandas).
    Regression trains on the standardised target (MSE); its rmse metric is in the target's units."""
    from functools import partial

    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat, MSELossFlat
    from fastai.metrics import AccumMetric, accuracy

    from .tabular import create_tabular_model

    if regression:
        loss, metric = MSELossFlat(), AccumMetric(partial(_rmse_in_units, scale=target_std), name="rmse")
    else:
        loss, metric = CrossEntropyLossFlat(), accuracy
    return Learner(dls, create_tabular_model(spec), loss_func=loss, metrics=metric, path=Path(path),
                   model_dir="checkpoints")
