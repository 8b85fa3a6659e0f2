"""The weights of the best validation epoch are the ones a run keeps (checkpoints/best.pt beside last.pt),
--patience stops a fit early, and the progress lines of an epoch carry the number its history row gets."""
from __future__ import annotations

import re

import polars as pl
import torch
from fastai.callback.core import Callback

from helpers import FASHION


class Worsen(Callback):
    """From the `start`-th epoch on (counted over fine_tune's phases), the head's weights x 50 before validation:
    the model's confident mistakes make that epoch's validation loss far worse than any before."""

    def __init__(self, start: int):
        self.start, self.epochs = start, 0

    def after_train(self):
        if self.epochs >= self.start:
            with torch.no_grad():
                self.learn.model[1][-1].weight.mul_(50)
        self.epochs += 1


def test_the_kept_epoch_is_the_best_and_patience_stops(tmp_path, monkeypatch, capsys):
    from fastai.torch_core import set_seed
    import pipelines.training
    from pipelines.backbones import get_spec
    from pipelines.images import ImagePreprocessing, image_dataloaders
    from pipelines.learners import image_learner
    from pipelines.logs import log_mode, set_log_mode
    from pipelines.precision import resolve_precision
    from pipelines.sources import check_files, read_source, require_classes
    from pipelines.training import train

    items = check_files(read_source(FASHION, seed=2))
    classes, spec = require_classes(items), get_spec("efficientnet_lite0")
    set_seed(2)
    dls = image_dataloaders(items, classes=classes, prep=ImagePreprocessing(size=32, mean=spec.mean, std=spec.std),
                            bs=32, num_workers=0)
    learn = image_learner(dls, "efficientnet_lite0", path=tmp_path,
                          precision=resolve_precision("fp32", arch="efficientnet_lite0", size=32))
    learn.add_cb(Worsen(2))
    monkeypatch.setattr(pipelines.training, "PROGRESS_SECONDS", 0.0)  # a progress line after every batch
    mode = log_mode()
    set_log_mode("lines")
    try:
        history = train(learn, epochs=4, lr=3e-3, freeze_epochs=1, checkpoints=tmp_path / "checkpoints", patience=1)
    finally:
        set_log_mode(mode)
    out = capsys.readouterr().out

    # 1 frozen + 4 unfrozen planned; epoch 2 is worse than 0 and 1, so --patience 1 stops after it
    valid = history["valid_loss"].to_list()
    assert history.height == 3 and valid[2] > max(valid[:2]), history
    kept = valid.index(min(valid))
    best = torch.load(tmp_path / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == kept and last["epoch"] == 3
    weights = learn.model.state_dict()
    assert all(torch.equal(weights[k].cpu(), v) for k, v in best["model"].items()), "the model is not the best epoch's"
    head = [k for k in best["model"] if k.startswith("1.")][-1]  # the head's last layer
    assert not torch.equal(weights[head].cpu(), last["model"][head]), "the last epoch's weights were kept"

    # killed after the stop, before the bundle: --resume trains no more epochs and ends with the kept weights
    from pipelines.checkpoints import load_checkpoint
    again = image_learner(dls, "efficientnet_lite0", path=tmp_path,
                          precision=resolve_precision("fp32", arch="efficientnet_lite0", size=32))
    resumed = train(again, epochs=4, lr=3e-3, freeze_epochs=1, checkpoints=tmp_path / "checkpoints", patience=1,
                    resume=load_checkpoint(tmp_path))
    assert resumed.height == 3
    weights = again.model.state_dict()
    assert all(torch.equal(weights[k].cpu(), v) for k, v in best["model"].items()), "resume lost the kept epoch"

    # each progress line names the epoch whose line follows it: 0 (frozen), then 1, 2 (unfrozen)
    numbers = [int(n) for n in re.findall(r"^epoch (\d+)", out, re.M)]
    assert numbers == sorted(numbers) and set(numbers) == {0, 1, 2}, out
    assert not re.search(r"^epoch \d+ \(\w+\):.*recall_", out, re.M), "per-class recall is for --verbose"


def test_a_run_reports_the_epoch_it_kept(trained_run):
    history = pl.read_csv(trained_run.run / "history.csv")
    valid = history["valid_loss"].to_list()
    resolved, results = trained_run.summary["resolved"], trained_run.summary["results"]
    assert resolved["kept_epoch"] == valid.index(min(valid)) and resolved["kept_metric"] == "valid_loss"
    assert results["valid_loss"] == min(valid)
    assert (trained_run.run / "checkpoints" / "best.pt").is_file() and (trained_run.run / "checkpoints" / "last.pt").is_file()
