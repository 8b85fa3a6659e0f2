"""Learner factories: a backbone from the registry, fastai's loss, metrics and body/head parameter split."""
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
