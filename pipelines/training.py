"""The training loop: lr_find (plot + csv), fastai fine_tune (frozen, then unfrozen phases) or fit_one_cycle with a
per-epoch history and checkpoints, and resuming inside a phase. FitConfig and the recipes of a whole run: run.py."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  fastai @patches fine_tune/fit_one_cycle onto Learner here
import numpy as np
import polars as pl
from fastai.callback.core import Callback
from fastai.callback.schedule import LRFinder, minimum, slide, steep, valley
from fastai.callback.progress import ProgressCallback
from fastai.learner import Recorder
from fastai.torch_core import find_bs, get_model

from .checkpoints import BEST, CHECKPOINT, BestEpoch, Checkpoint, lowest, restore
from .errors import ItfitsError
from .io import write_table
from .distributed import is_main
from .learners import OutlierExposureLoss, find_ema, uncompile
from .logs import PROGRESS_SECONDS, log_mode, say, verbose
from .plots import plot_lr_find

# `--epochs` not given (images and audio): (least training items, unfrozen epochs), the largest first. On the suite
# (bench/BENCHMARKS.md, "Epochs by the data size"), at 120-158 training items 8 epochs beat 5 on every set with the
# whole body trained and on the means with the Lites' last stage only; at 445-576, 5 beat 3 on the means but not
# on every set: the gain of more epochs shrinks as data grows.
AUTO_EPOCHS = ((250, 5), (0, 8))


def auto_epochs(n_train: int) -> tuple[int, str]:
    """(unfrozen epochs, why) for a run of `n_train` training items (audio: windows) when --epochs is not given."""
    least, epochs = next((least, e) for least, e in AUTO_EPOCHS if n_train >= least)
    bound = f"at least {least}" if least else f"fewer than {min(n for n, _ in AUTO_EPOCHS if n)}"
    return epochs, f"{n_train} training items, {bound}"


LR_SUGGESTIONS = ("minimum", "steep", "valley", "slide")
CHOSEN_SUGGESTION = "minimum"  # lr at the loss minimum / 10 (fastai's lr_min): valley (4e-4) trained
# Fashion-MNIST to 0.71 test accuracy in bench/unknown_scores.py settings, minimum (2.8e-3) to 0.85, steep (6e-3) 0.79


class History(Callback):
    """One row per epoch over every fit of the Learner (fine_tune runs two: frozen, then unfrozen), continuing
    `rows` of a resumed run. images: training images this process saw (its shard in data-parallel runs);
    images_per_s: those per second of the epoch's training part."""
    order = Recorder.order + 1  # after Recorder has written this epoch's log

    def __init__(self, rows: list[dict] | None = None, *, phases: bool = True):
        self.rows, self.phases = list(rows or []), phases  # phases: fine_tune's frozen/unfrozen (not tables)

    def before_epoch(self):
        self.start, self.images, self.train_seconds, self.skipped = time.perf_counter(), 0, 0.0, False

    def before_train(self):
        self.train_start = time.perf_counter()

    def after_batch(self):
        if self.training:
            self.images += find_bs(self.yb)

    def after_train(self):
        self.train_seconds = time.perf_counter() - self.train_start

    def after_cancel_epoch(self):  # an epoch a resumed run skips (fastai's SkipToEpoch)
        self.skipped = True

    def after_epoch(self):
        if self.skipped:
            return
        row = {n: v for n, v in zip(self.recorder.metric_names, self.recorder.log) if n not in ("epoch", "time")}
        phase = {"phase": "frozen" if self.opt.frozen_idx else "unfrozen"} if self.phases else {}
        self.rows.append({"epoch": len(self.rows), **phase, **row,
                          "seconds": round(time.perf_counter() - self.start, 2), "images": self.images,
                          "images_per_s": round(self.images / max(self.train_seconds, 1e-9), 2)})
        if log_mode() in ("lines", "json") and is_main():  # bars: fastai's table shows the epoch
            say(epoch_line(self.rows[-1]), "epoch", **self.rows[-1])


def epoch_line(row: dict) -> str:
    """One epoch of the history as a line: `epoch 2 (unfrozen): train_loss 0.41, valid_loss 0.38, ... (3.2 s)`."""
    values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                       if k not in ("epoch", "phase", "seconds", "images", "images_per_s")
                       and (verbose() or not k.startswith("recall_")))  # per-class recall: --verbose
    phase = f" ({row['phase']})" if "phase" in row else ""
    return f"epoch {row['epoch']}{phase}: {values} ({row['seconds']:.1f} s)"


class BatchProgress(Callback):
    """Lines and json log modes: a line (event "progress") every PROGRESS_SECONDS within a long epoch or lr_find,
    where fastai would redraw a bar. An epoch's line carries the number its History row gets (counted over
    fine_tune's phases and a resumed run's epochs); lr_find's counts its iterations over all its passes."""

    def before_fit(self):
        self.last = self.fit_start = time.perf_counter()

    def before_epoch(self):
        self.start = time.perf_counter()

    def after_batch(self):
        now = time.perf_counter()
        if not self.training or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        finder = next((cb for cb in self.learn.cbs if isinstance(cb, LRFinder)), None)
        if finder is not None:
            what, done, total, start = "lr_find", self.train_iter, finder.num_it, self.fit_start
        else:
            history = next((cb for cb in self.learn.cbs if isinstance(cb, History)), None)
            what = f"epoch {len(history.rows) if history is not None else self.epoch}"
            done, total, start = self.iter + 1, self.n_iter, self.start
        say(f"{what}: batch {done}/{total} ({now - start:.0f} s)", "progress", what=what, done=done, total=total,
            seconds=round(now - start, 1))


def follow_log_mode(learn) -> None:
    """Outside a terminal (logs.log_mode() not "bars"): no fastprogress bar or table on the Learner; History
    prints an epoch's line and BatchProgress the lines of a long epoch instead (lines, json), or nothing (quiet)."""
    if log_mode() == "bars":
        return
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a, **k: None  # the Recorder's table rows
    if log_mode() != "quiet" and is_main() and not any(isinstance(cb, BatchProgress) for cb in learn.cbs):
        learn.add_cb(BatchProgress())


def best_epoch(losses: list) -> int | None:
    """Index of the first lowest finite loss, or None when none is finite (the epoch BestEpoch keeps)."""
    return lowest(losses)


def _tolerant(suggest):
    """A fastai lr suggestion function that gives NaN where the recorded curve is too short for it (slide needs
    more than 15 points; lr_find stops early when the loss diverges) instead of failing."""
    def tolerant(lrs, losses, num_it):
        try:
            return suggest(lrs, losses, num_it)
        except (IndexError, ValueError, RuntimeError):
            return float("nan"), (float("nan"), float("nan"))
    tolerant.__name__ = suggest.__name__  # lr_find names its results after the functions
    return tolerant


def find_lr(learn, out_dir: Path | None = None, *, num_it: int = 100) -> tuple[float, dict[str, float]]:
    """(chosen lr, all suggestions); writes lr_find.png and lr_find.csv into out_dir when given."""
    tmp_dir = Path(learn.path) / learn.model_dir  # fastai's lr_find keeps the weights there meanwhile
    made_tmp_dir = not tmp_dir.exists()
    loss = learn.loss_func
    if isinstance(loss, OutlierExposureLoss):  # the suggestions read the loss of the classes' items alone: the
        # outlier term rises as the model learns the classes, and the loss's minimum came in the first steps
        learn.loss_func = OutlierExposureLoss(loss.n_classes, weight=0, class_weights=loss.class_weights)  # (minimum
        # 7.6e-8 on the suite's icons)
    follow_log_mode(learn)
    try:
        res = learn.lr_find(suggest_funcs=tuple(map(_tolerant, (minimum, steep, valley, slide))), show_plot=False,
                            num_it=num_it)
    finally:
        learn.loss_func = loss
    if made_tmp_dir and tmp_dir.is_dir() and not any(tmp_dir.iterdir()):
        tmp_dir.rmdir()  # it removes the weights, not the folder it made for them
    suggestions = {name: float(v) for name, v in zip(LR_SUGGESTIONS, res) if np.isfinite(v)}
    if CHOSEN_SUGGESTION not in suggestions:
        raise ItfitsError(f"lr_find recorded {len(learn.recorder.losses)} losses, too few to suggest a learning rate "
                          f"(it stops early when the loss diverges); give one with --lr")
    rec = learn.recorder
    lrs, losses = np.asarray(rec.lrs, dtype=float), np.asarray([float(x) for x in rec.losses])
    if out_dir is not None:
        write_table(pl.DataFrame({"lr": lrs, "loss": losses}), Path(out_dir) / "lr_find.csv")
        plot_lr_find(lrs, losses, suggestions, CHOSEN_SUGGESTION, Path(out_dir) / "lr_find.png")
    return suggestions[CHOSEN_SUGGESTION], suggestions


@dataclass(frozen=True)
class Phase:
    name: str  # "frozen" (head only) or "unfrozen"
    epochs: int
    lr: slice  # fastai's lr_max: one lr, or body..head discriminative lrs
    kwargs: tuple  # more fit_one_cycle arguments as (key, value) pairs


def fine_tune_phases(*, epochs: int, lr: float, freeze_epochs: int = 1) -> list[Phase]:
    """fastai's `fine_tune` (lr_mult=100, pct_start=0.3, div=5) as data, so a resumed run can start in either
    phase: one-cycle on the head at lr, then on everything at lr/2, the body at a 100th of the head's lr."""
    head_lr = lr / 2
    return [Phase("frozen", freeze_epochs, slice(lr), (("pct_start", 0.99),)),
            Phase("unfrozen", epochs, slice(head_lr / 100, head_lr), (("pct_start", 0.3), ("div", 5.0)))]


def train(learn, *, epochs: int, lr: float, freeze_epochs: int = 1, checkpoints: Path | None = None,
          resume: dict | None = None, checkpoint_meta: dict | None = None, fine_tune: bool = True,
          patience: int | None = None) -> pl.DataFrame:
    """fastai fine_tune: `freeze_epochs` on the head, then `epochs` unfrozen, one-cycle. Returns the history.
    With `checkpoints` (a folder), each epoch ends by writing checkpoints/last.pt; with `resume` (such a checkpoint,
    see checkpoints.load_checkpoint) training continues after its epoch, in its phase, at its one-cycle position.
    The model ends with the weights of the epoch of lowest validation loss (`BestEpoch`; with an EMA callback on
    the Learner, the EMA's), also in checkpoints/best.pt; `patience`: stop after that many epochs without a lower
    one. fine_tune=False (a table: no pretrained body): one fit_one_cycle of `epochs`, no checkpoints."""
    follow_log_mode(learn)
    if not fine_tune:
        history = History(phases=False)
        best = BestEpoch(history, patience=patience)
        learn.fit_one_cycle(epochs, lr, cbs=[history, best])
        best.restore(learn)
        table = pl.DataFrame(history.rows).rename({"images": "rows", "images_per_s": "rows_per_s"})
        return _check_finite(table, lr, row=best.epoch_kept)
    history = History(resume["history"] if resume else None)
    best = BestEpoch(history, path=None if checkpoints is None else Path(checkpoints) / BEST, patience=patience,
                     resume=resume)
    done = resume["epoch"] if resume else 0  # epochs finished over both phases
    first = 0  # this phase's first epoch, counted over both phases
    for phase in fine_tune_phases(epochs=epochs, lr=lr, freeze_epochs=freeze_epochs):
        if phase.epochs == 0 or done >= first + phase.epochs or best.stopped:
            first += phase.epochs
            continue
        learn.freeze() if phase.name == "frozen" else learn.unfreeze()
        # gradients of micro-batches --accum summed at the previous phase's end (fastai's GradientAccumulation skips
        # zero_grad until it steps) belong to other weights and another set of trained parameters: not this phase's
        learn.model.zero_grad(set_to_none=True)
        smooth_loss, accum_count = None, 0
        if resume is not None:
            # at a phase's start fastai's freeze/unfreeze clears the optimizer state, and the EMA starts afresh
            restore(learn, resume, phase_start=done == first)
            if done > first:
                smooth_loss, accum_count = resume.get("smooth_loss"), (resume.get("accum") or {}).get("count", 0)
            resume = None
        cbs = [history, best]
        if checkpoints is not None:
            cbs.append(Checkpoint(Path(checkpoints) / CHECKPOINT, first_epoch=first, history=history,
                                  meta=checkpoint_meta or {}, smooth_loss=smooth_loss, accum_count=accum_count))
        # start_epoch: fastai's SkipToEpoch skips the epochs done; pct_train, and so the one-cycle, starts there
        learn.fit_one_cycle(phase.epochs, phase.lr, start_epoch=max(0, done - first), cbs=cbs, **dict(phase.kwargs))
        first += phase.epochs
    ema = find_ema(learn)
    if resume is not None:  # every epoch was done (killed before the bundle was written): the checkpoint's weights
        get_model(learn.model).load_state_dict(resume["ema"]["model"] if ema is not None and resume.get("ema")
                                               else resume["model"])
    elif ema is not None and getattr(learn, "model_ema", None) is not None:
        learn.model.load_state_dict(learn.model_ema.state_dict())  # calibration and the bundle use the EMA weights
    best.restore(learn)  # the best epoch's (EMA) weights
    uncompile(learn.model)
    return _check_finite(pl.DataFrame(history.rows), lr, row=best.epoch_kept)


def _check_finite(history: pl.DataFrame, lr: float, *, row: int | None = -1) -> pl.DataFrame:
    """The history of a training whose losses at `row` (the epoch whose weights are kept; default the last) are
    numbers; a diverged one (inf, NaN) is an ItfitsError, so no run saves a model that predicts NaN."""
    last = {k: history[k][-1 if row is None else row] for k in ("train_loss", "valid_loss") if k in history.columns}
    if not all(v is not None and np.isfinite(v) for v in last.values()):
        raise ItfitsError(f"training diverged ({', '.join(f'{k} {v}' for k, v in last.items())} after epoch "
                          f"{history.height}); no model saved. Train with a lower --lr than {lr:.2e}")
    return history


MOVED_TO_RUN = ("FitConfig", "fit", "fit_table", "train_images", "finish_images", "run_lr_find", "resume_config",
                "write_run_config", "config_defaults")


def __getattr__(name: str):
    """pipelines.training.FitConfig and the other names of a run moved to pipelines.run: found there, with a warning."""
    if name in MOVED_TO_RUN:
        from . import run
        warnings.warn(f"pipelines.training.{name} moved: from pipelines.run import {name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
