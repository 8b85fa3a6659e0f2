"""Frozen features computed once: where the backbone keeps its stem and first stages frozen (backbones.freeze_stem,
the Lites' default), their output for each training item is computed once per augmented view and the Learner
trains the rest (the last stage and the head) on it. The Learner stays a fastai Learner (its callbacks, EMA,
accumulation, balance, checkpoints, work unchanged): for the fit its model is the trainable tail, which shares
its modules with the full network, and its DataLoaders yield the cached tensors. `FrozenFeatures.restore` puts
the full network and the file DataLoaders back: the bundle and prediction are as without the cache."""
from __future__ import annotations

import copy
import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from torch import nn

from .backbones import stem_names
from .features import run_until

# Augmented views cached per training item, cycled over the epochs (bench/BENCHMARKS.md, "Frozen features
# computed once"). A modality without augmentation (audio) caches its one view; 0: no cache (the stem computed at
# every step, as before the cache).
CACHE_VIEWS = 3
# Cached features up to this size stay in memory; a larger cache is a memory-mapped file in the run folder.
MEMORY_BUDGET = 2 * 2**30
CACHE_FILE = "frozen_features.tmp"


def frozen_stages(model: nn.Module) -> int:
    """How many stages of `model`'s body (model[0]) freeze_stem froze: 0 means nothing to cache."""
    return getattr(model[0], "frozen_stages", 0) if isinstance(model, nn.Sequential) and len(model) == 2 else 0


def _replaced(module: nn.Module, names: list[str]) -> nn.Module:
    """A shallow copy of `module` whose submodules `names` (dotted) are nn.Identity; every other submodule is
    the very same object: the copy's parameters are the module's own."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    inner: dict[str, list[str]] = {}
    for name in names:
        first, _, rest = name.partition(".")
        inner.setdefault(first, [])
        if rest:
            inner[first].append(rest)
    for first, rests in inner.items():
        out._modules[first] = _replaced(module._modules[first], rests) if rests else nn.Identity()
    return out


def trainable_tail(model: nn.Sequential) -> nn.Sequential:
    """(body without its frozen stem, head): from the stem's output to the logits, sharing `model`'s weights."""
    body = model[0]
    return nn.Sequential(_replaced(body, stem_names(body, frozen_stages(model))), model[1])


def stem_output(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The frozen stem's output for a batch `x`: the input of the body's first trainable stage."""
    body = model[0]
    last = stem_names(body, frozen_stages(model))[-1]
    return run_until(body, body.get_submodule(last), x, output=True)


class CachedItems:
    """Cached stem outputs (views, items, ...) and the items' targets; indexing with a tensor of item numbers
    gives a whole batch of the current `view` (prepare.TensorBatches)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets, self.view = features, targets, 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, idx):
        return self.features[self.view][idx], self.targets[idx]


def _batches(dataset: CachedItems, like, wgts=None):
    """A prepare.TensorBatches over `dataset` that batches, shuffles and samples as the DataLoader `like` does."""
    from .prepare import TensorBatches

    class WeightedBatches(TensorBatches):  # fastai's WeightedDL draws with numpy's global RNG: the same here
        def get_idxs(self):
            return list(np.random.choice(self.n, self.n, p=self.wgts)) if self.shuffle else super().get_idxs()

    dl = (WeightedBatches if wgts is not None else TensorBatches)(
        dataset, bs=like.bs, shuffle=like.shuffle, drop_last=like.drop_last, device=like.device)
    dl.wgts = wgts
    dl.rng.setstate(like.rng.getstate())  # the same order of items as `like` would have drawn
    return dl


class CycleViews(Callback):
    """The training items' view of each epoch: epoch e of the run (over both fine_tune phases) reads view e % K."""

    def __init__(self, items: CachedItems, *, freeze_epochs: int):
        self.items, self.freeze_epochs = items, freeze_epochs

    def before_epoch(self):
        frozen = bool(getattr(self.opt, "frozen_idx", 0)) if self.opt is not None else True
        self.items.view = (self.epoch + (0 if frozen else self.freeze_epochs)) % len(self.items.features)


@contextmanager
def _rng_kept():
    """Python's, numpy's and torch's RNG states as they were: a cached run draws the same shuffles and dropout
    masks as one without the cache (its augmented views are drawn meanwhile)."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _storage(shape: tuple, dtype: torch.dtype, path: Path | None) -> torch.Tensor:
    """An empty tensor of `shape`: in memory, or memory-mapped to the file `path`."""
    if path is None:
        return torch.empty(shape, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return torch.from_file(str(path), shared=True, size=int(np.prod(shape)), dtype=dtype).view(shape)


@dataclass
class FrozenFeatures:
    """What `cache_frozen_features` took from the Learner, and the cache: `restore` puts the former back."""
    model: nn.Module  # the full network
    dls: DataLoaders  # the DataLoaders over the files
    cycle: CycleViews
    views: int
    nbytes: int
    files: list[Path]  # the memory-mapped files; []: in memory
    stages: int
    budget: int  # bytes the cache may hold in memory

    def line(self) -> str:
        where = (f"memory-mapped in {self.files[0].parent} (over the {self.budget / 2**30:.2g} GiB kept in memory)"
                 if self.files else f"in memory (budget {self.budget / 2**30:.2g} GiB)")
        stages = self.stages
        n_train, n_valid = len(self.cycle.items), len(self.dls.valid_ds)
        return (f"frozen features: the stem and first {stages} stages computed once, {self.views} view"
                f"{'s' * (self.views > 1)} of {n_train} training items and {n_valid} validation items, "
                f"{self.nbytes / 2**20:.1f} MB {where}")

    def restore(self, learn) -> None:
        """The full network (its trained tail included) and the file DataLoaders back on `learn`."""
        learn.model = self.model.to(next(learn.model.parameters()).device)
        learn.dls = self.dls
        learn.remove_cb(self.cycle)
        for path in self.files:
            path.unlink(missing_ok=True)  # the mapping stays valid until the tensors go


@torch.no_grad()
def _compute(stem, loader, *, views: int, precision, channels_last: bool, path: Path | None, budget: int):
    """(features (views, n, ...), targets, the memory-mapped file or None) of every item of `loader` (unshuffled),
    `views` passes over it."""
    features = targets = mapped = None
    for view in range(views):
        start = 0
        for xb, yb in loader:
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with precision.autocast() if precision else nullcontext():
                out = stem(xb)
            out = out.contiguous().cpu()
            if features is None:
                n = len(loader.dataset)
                shape = (views, n, *out.shape[1:])
                size = int(np.prod(shape)) * out.element_size()
                mapped = path if size > budget else None
                features = _storage(shape, out.dtype, mapped)
                targets = []
            features[view, start:start + len(out)] = out
            if view == 0:
                targets.append(yb.cpu())
            start += len(out)
    return features, torch.cat(targets), mapped


def cache_frozen_features(learn, *, augment: bool, freeze_epochs: int, precision=None, channels_last: bool = False,
                          views: int | None = None, folder: Path | None = None,
                          budget: int = MEMORY_BUDGET) -> FrozenFeatures | None:
    """Compute the frozen stem's output once per training item and view (`views`, default CACHE_VIEWS where the
    data is augmented, else 1) and per validation item (un-augmented), and make `learn` train its trainable tail
    on them: its model the tail, its DataLoaders the cached tensors. None (the Learner as it was) where the model
    has no frozen stages. Features above `budget` bytes go to a memory-mapped file in `folder` (default the
    Learner's path; ~/.cache/itfits where that is not writable). Call `.restore(learn)` after training."""
    model = learn.model
    stages = frozen_stages(model)
    views = CACHE_VIEWS if views is None else views
    if not stages or not views:
        return None
    views = views if augment else 1  # without augmentation every view is the same
    dls = learn.dls
    device = dls.device or next(model.parameters()).device
    model.to(device)
    was_training = model.training
    model.eval()
    folder = Path(folder if folder is not None else learn.path)
    if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
        folder = Path.home() / ".cache" / "itfits"
    with _rng_kept():
        stem = lambda x: stem_output(model, x)  # noqa: E731
        kw = dict(precision=precision, channels_last=channels_last, budget=budget)
        # the training items in order, through the training transforms (aug_transforms' random draws)
        train_f, train_y, train_file = _compute(stem, dls.train.new(shuffle=False, drop_last=False), views=views,
                                    path=folder / CACHE_FILE, **kw)
        valid_f, valid_y, valid_file = _compute(stem, dls.valid, views=1, path=folder / ("valid_" + CACHE_FILE), **kw)
        train = CachedItems(train_f, train_y)
        cached = DataLoaders(_batches(train, dls.train, getattr(dls.train, "wgts", None)),
                             _batches(CachedItems(valid_f, valid_y), dls.valid), device=dls.device)
    model.train(was_training)
    cycle = CycleViews(train, freeze_epochs=freeze_epochs)
    state = FrozenFeatures(model=model, dls=dls, cycle=cycle, views=views,
                           nbytes=sum(f.numel() * f.element_size() for f in (train_f, valid_f)),
                           files=[f for f in (train_file, valid_file) if f is not None], stages=stages, budget=budget)
    learn.model, learn.dls = trainable_tail(model), cached
    learn.add_cb(cycle)
    return state
