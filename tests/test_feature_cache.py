"""Frozen features computed once (pipelines/feature_cache.py) on real small data: the cached fit is the uncached
one, the stem runs once per item and view across lr_find and the epochs, and a large cache is memory-mapped."""
from __future__ import annotations

import polars as pl
import pytest
import torch

from helpers import FASHION

ARCH = "efficientnet_lite0"


@pytest.fixture(scope="module")
def items():
    from pipelines.backbones import get_spec
    from pipelines.images import ImagePreprocessing
    from pipelines.sources import check_files, read_source, require_classes
    items = check_files(read_source(FASHION, seed=1))
    # 16 training and 4 validation images a class: a few batches of 16 an epoch, cheap enough for the suite
    items = pl.concat([items.filter(pl.col("split") == split).group_by("label", maintain_order=True).head(n)
                       for split, n in (("train", 16), ("valid", 4))])
    spec = get_spec(ARCH)
    return items, require_classes(items), ImagePreprocessing(size=32, mean=spec.mean, std=spec.std)


def learner(items, tmp_path, *, augment: bool, weights: str = "auto"):
    from fastai.torch_core import set_seed
    from pipelines.images import image_dataloaders
    from pipelines.learners import image_learner
    from pipelines.training import follow_log_mode
    rows, classes, prep = items
    set_seed(1)
    dls = image_dataloaders(rows, classes=classes, prep=prep, bs=16, num_workers=0, augment=augment)
    set_seed(1)
    learn = image_learner(dls, ARCH, weights=weights, path=tmp_path)
    follow_log_mode(learn)
    return learn


def test_cached_fit_gives_the_uncached_fits_validation_predictions(items, tmp_path):
    """One view, no augmentation, one seed: the same shuffles, dropout masks and steps, so the same model."""
    from pipelines.feature_cache import cache_frozen_features
    from pipelines.training import train
    preds, states = [], []
    for cached in (False, True):
        learn = learner(items, tmp_path / str(cached), augment=False)
        files = learn.dls
        frozen = cache_frozen_features(learn, augment=False, freeze_epochs=1) if cached else None
        assert (frozen is not None) == cached
        train(learn, epochs=1, lr=3e-3, freeze_epochs=1)
        if frozen is not None:
            assert learn.dls is not files and learn.model is not frozen.model  # it trained the tail on the cache
            frozen.restore(learn)
        assert learn.dls is files
        preds.append(learn.get_preds(dl=files.valid)[0])
        states.append(learn.model.state_dict())
    assert states[0].keys() == states[1].keys()  # the full network comes back: the bundle saves what it did
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(preds[1], preds[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(preds[0], learner(items, tmp_path / "fresh", augment=False).get_preds(
        dl=learn.dls.valid)[0])  # training changed the model: the equality above is no untrained one


def test_the_stem_runs_once_per_item_and_view_across_lr_find_and_the_epochs(items, tmp_path):
    from pipelines.feature_cache import cache_frozen_features
    from pipelines.training import find_lr, train
    learn = learner(items, tmp_path, augment=True)
    seen = []
    last_stem_stage = learn.model[0].blocks[5]
    last_stem_stage.register_forward_hook(lambda module, args, out: seen.append(len(out)))
    n_train, n_valid = len(learn.dls.train_ds), len(learn.dls.valid_ds)
    frozen = cache_frozen_features(learn, augment=True, freeze_epochs=1, views=2)
    assert sum(seen) == 2 * n_train + n_valid
    views = frozen.cycle.items.features
    assert views.shape[:2] == (2, n_train) and not torch.equal(views[0], views[1])  # two augmented draws
    lr, _ = find_lr(learn, num_it=12)  # 12 steps of 16: three passes over the 64 training items
    train(learn, epochs=1, lr=lr, freeze_epochs=1)
    assert sum(seen) == 2 * n_train + n_valid  # lr_find, 2 epochs and their validation read the cache
    frozen.restore(learn)
    learn.get_preds(dl=learn.dls.valid)
    assert sum(seen) == 2 * n_train + 2 * n_valid  # the restored full network runs its stem again


def test_a_cache_over_the_memory_budget_is_memory_mapped_and_removed_after(items, tmp_path):
    from pipelines.feature_cache import cache_frozen_features
    in_memory = cache_frozen_features(learner(items, tmp_path / "a", augment=False), augment=False, freeze_epochs=1)
    learn = learner(items, tmp_path / "b", augment=False)
    mapped = cache_frozen_features(learn, augment=False, freeze_epochs=1, folder=tmp_path / "run", budget=0)
    assert in_memory.files == [] and "in memory" in in_memory.line()
    assert [f.parent for f in mapped.files] == [tmp_path / "run"] * 2 and all(f.is_file() for f in mapped.files)
    assert "memory-mapped" in mapped.line() and f"{mapped.nbytes / 2**20:.1f} MB" in mapped.line()
    torch.testing.assert_close(mapped.cycle.items.features, in_memory.cycle.items.features, rtol=0, atol=0)
    mapped.restore(learn)
    assert not any(f.exists() for f in mapped.files)


def test_no_frozen_stages_no_cache(items, tmp_path):
    """--weights none trains the whole network: nothing is frozen, so nothing is cached."""
    from pipelines.feature_cache import cache_frozen_features
    learn = learner(items, tmp_path, augment=False, weights="none")
    model, dls = learn.model, learn.dls
    assert cache_frozen_features(learn, augment=False, freeze_epochs=1) is None
    assert learn.model is model and learn.dls is dls
