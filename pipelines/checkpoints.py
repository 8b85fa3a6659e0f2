"""Checkpoints at each epoch end (RUN/checkpoints/last.pt) and what `itfits fit --resume RUN` needs to go on.

A checkpoint holds the model, the optimizer state, the epoch (over both fine_tune phases), the history so far, the
EMA state, the gradients --accum summed but has not stepped on, the RNG states (torch, CUDA, numpy, python, the
training DataLoader's shuffle) and what the run resolved (lr, precision). These are our own internal files, so
torch.save; they hold only tensors and plain Python values and are loaded with weights_only=True, never unpickling
objects. The bundle stays safetensors. RUN/checkpoints/config.json is the FitConfig the run started with.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import Recorder

from .distributed import is_main
from .errors import ItfitsError
from .io import atomic_path
from .learners import find_ema

CHECKPOINT, CONFIG = "last.pt", "config.json"
FORMAT = 1


def _plain(v):
    """numpy scalars and fastai L -> Python values, so weights_only loading needs no allow-list."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)) and not isinstance(v, (str, bytes)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def rng_state(learn) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    dl_rng = getattr(learn.dls.loaders[0], "rng", None)
    if isinstance(dl_rng, random.Random):
        state["train_dl"] = dl_rng.getstate()
    return state


def set_rng_state(learn, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # saved: one per GPU then visible
    dl_rng = getattr(learn.dls.loaders[0], "rng", None)
    if "train_dl" in state and isinstance(dl_rng, random.Random):
        dl_rng.setstate(_tuples(state["train_dl"]))


def _tuples(v):  # random.setstate wants the nested tuples back
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def save_checkpoint(path: Path, learn, *, epoch: int, history: list[dict], meta: dict) -> None:
    """Write the checkpoint beside `path`, then rename: a kill mid-write leaves the previous one whole."""
    from fastai.torch_core import get_model
    opt = learn.opt.state_dict()
    ema = find_ema(learn)
    state = {"format": FORMAT, "epoch": epoch, "history": _plain(history), **_plain(meta),
             "model": get_model(learn.model).state_dict(),
             "opt": {"state": _plain(opt["state"]), "hypers": _plain(list(opt["hypers"]))},
             "ema": ema.state_dict() if ema is not None and getattr(ema, "ema_model", None) is not None else None,
             # fastai's train_loss is a moving average over the fit: a resumed fit goes on with it, not afresh
             "smooth_loss": {"val": float(learn.recorder.smooth_loss.val),
                             "count": int(learn.recorder.smooth_loss.count)},
             "rng": _plain(rng_state(learn)),
             # gradient accumulation carries micro-batches over an epoch's end: their summed gradients and count
             **_accumulated(learn)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _accumulation_cb(learn):
    from fastai.callback.training import GradientAccumulation
    return next((cb for cb in learn.cbs if isinstance(cb, GradientAccumulation)), None)


def _accumulated(learn) -> dict:
    """{"accum": {count, grads}} where a GradientAccumulation holds micro-batches not yet stepped on, else {}."""
    from fastai.torch_core import get_model
    acc = _accumulation_cb(learn)
    if acc is None or not getattr(acc, "count", 0):
        return {}
    grads = {n: p.grad.detach().clone() for n, p in get_model(learn.model).named_parameters() if p.grad is not None}
    return {"accum": {"count": int(acc.count), "grads": grads}}


def load_checkpoint(run: Path) -> dict:
    """The last checkpoint of run folder `run` (see save_checkpoint)."""
    path = Path(run) / "checkpoints" / CHECKPOINT
    if not path.is_file():
        raise ItfitsError(f"{run} has no checkpoint to resume ({path} is missing): it stopped before its first "
                          f"epoch ended, or is not a run folder. Start it again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ItfitsError(f"cannot read checkpoint {path}: {e}") from e
    if state.get("format") != FORMAT:
        raise ItfitsError(f"{path} has checkpoint format {state.get('format')}; this itfits reads {FORMAT}")
    return state


def read_run_config(run: Path) -> dict:
    """The FitConfig (as a dict) that the run in folder `run` started with."""
    path = Path(run) / "checkpoints" / CONFIG
    if not path.is_file():
        if _tabular_run(Path(run)):
            raise ItfitsError(f"{run} is a tabular run, and tabular training keeps no checkpoints (it takes seconds "
                              f"to minutes): run the same itfits fit again")
        raise ItfitsError(f"{run} is not a run folder that can be resumed ({path} is missing); pass the --out folder "
                          f"of an interrupted itfits fit")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ItfitsError(f"{path} is damaged ({e}); the run cannot be resumed, start it again with itfits fit") from e
    if not isinstance(config, dict) or "data" not in config:
        raise ItfitsError(f"{path} holds no run settings; the run cannot be resumed, start it again with itfits fit")
    return config


def _tabular_run(run: Path) -> bool:
    """Whether `run` holds a finished tabular run (its run.json names a --target)."""
    try:
        return bool(json.loads((run / "run.json").read_bytes())["config"].get("target"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def restore(learn, state: dict, *, phase_start: bool = False) -> None:
    """Put a checkpoint's model, optimizer, EMA and RNG states into `learn`, already frozen or unfrozen for the
    phase it resumes in (the optimizer must exist with that phase's parameter groups). `phase_start`: the
    checkpoint ended the previous phase; the new one starts with a cleared optimizer state (fastai's freeze and
    unfreeze clear it) and its own EMA."""
    from fastai.torch_core import get_model
    from fastcore.foundation import L
    get_model(learn.model).load_state_dict(state["model"])
    if learn.opt is None:
        learn.create_opt()
    learn.opt.load_state_dict({"state": state["opt"]["state"], "hypers": L(state["opt"]["hypers"])})
    if phase_start:
        learn.opt.clear_state()
    elif state.get("accum"):  # micro-batches accumulated before the kill: their gradients (the count: Checkpoint)
        params = dict(get_model(learn.model).named_parameters())
        for n, g in state["accum"]["grads"].items():
            params[n].grad = g.to(params[n].device)
    ema = find_ema(learn)
    if ema is not None and state.get("ema") is not None and not phase_start:
        ema.pending = state["ema"]  # applied by the EMA callback once it has built its EMA model in before_fit
    set_rng_state(learn, state["rng"])


class Checkpoint(Callback):
    """At each epoch end (not the ones a resumed run skips), the checkpoint at `path`, in the main process only.
    `first_epoch`: this fit's first epoch counted over both fine_tune phases; `smooth_loss`: the training loss
    average to go on with (a fit resumed in its middle)."""
    order = Recorder.order + 2  # after Recorder and History have logged the epoch

    def __init__(self, path: Path, *, first_epoch: int, history, meta: dict, smooth_loss: dict | None = None,
                 accum_count: int = 0):
        self.path, self.first_epoch, self.history, self.meta = Path(path), first_epoch, history, meta
        self.smooth_loss = smooth_loss  # of the checkpoint a fit resumes from, in its middle
        self.accum_count = accum_count  # samples GradientAccumulation had summed when that checkpoint was written

    def before_fit(self):  # after Recorder's, which starts the moving average afresh, and GradientAccumulation's
        if self.smooth_loss is not None:
            self.recorder.smooth_loss.val = torch.tensor(self.smooth_loss["val"])
            self.recorder.smooth_loss.count = self.smooth_loss["count"]
        acc = _accumulation_cb(self.learn)
        if acc is not None and self.accum_count:
            acc.count = self.accum_count

    def before_epoch(self):
        self.skipped = False

    def after_cancel_epoch(self):
        self.skipped = True

    def after_epoch(self):
        if self.skipped or not is_main():
            return
        save_checkpoint(self.path, self.learn, epoch=self.first_epoch + self.epoch + 1, history=self.history.rows,
                        meta=self.meta)


BEST, MONITOR = "best.pt", "valid_loss"  # the kept epoch: the lowest validation loss (first of equals)


def lowest(values: list) -> int | None:
    """Index of the first lowest finite value, or None when none is finite."""
    finite = [(v, i) for i, v in enumerate(values) if v is not None and np.isfinite(v)]
    return min(finite)[1] if finite else None


class BestEpoch(Callback):
    """The weights of the best validation epoch (lowest MONITOR over every fit of the Learner: fine_tune's phases
    share one instance), kept in memory and written to `path` (checkpoints/best.pt) when given; `restore` loads
    them at the end. With `patience`, the fit stops once that many epochs passed without a better one (the next
    epoch's start raises CancelFitException; `train` skips the phases left). It reads the epochs from `history`
    (a training.History), so it works whatever DataLoaders feed the Learner; `resume`: a checkpoint's history,
    whose best epoch's weights are read back from `path`. Weights: what validation ran (the EMA's, where on)."""
    order = Checkpoint.order + 1  # after History and Checkpoint: a stop leaves the last epoch's checkpoint

    def __init__(self, history, *, path: Path | None = None, patience: int | None = None, resume: dict | None = None):
        self.history, self.path, self.patience = history, None if path is None else Path(path), patience
        self.seen, self.state = len(history.rows), None
        kept = self.epoch_kept
        if resume is None or kept is None:
            return
        saved = torch.load(self.path, map_location="cpu", weights_only=True) if self.path and self.path.is_file() \
            else {}
        if saved.get("epoch") == kept:
            self.state = saved["model"]
        elif kept == resume["epoch"] - 1:  # killed between last.pt and best.pt: the checkpoint's weights are the best
            self.state = (resume.get("ema") or {}).get("model") or resume["model"]

    @property
    def epoch_kept(self) -> int | None:
        return lowest([row.get(MONITOR) for row in self.history.rows])

    @property
    def stopped(self) -> bool:
        """--patience epochs have passed since the best one."""
        kept = self.epoch_kept
        return self.patience is not None and kept is not None and len(self.history.rows) - 1 - kept >= self.patience

    def before_epoch(self):
        if self.stopped:
            from fastai.callback.core import CancelFitException
            raise CancelFitException()

    def after_epoch(self):
        rows = self.history.rows
        if len(rows) == self.seen:  # an epoch a resumed run skipped: History added no row
            return
        self.seen = len(rows)
        if self.epoch_kept != len(rows) - 1:
            return
        from fastai.torch_core import get_model
        ema = find_ema(self.learn)
        validated = ema.ema_model if ema is not None and getattr(ema, "ema_model", None) is not None else \
            get_model(self.learn.model)
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in validated.state_dict().items()}
        if self.path is not None and is_main():
            with atomic_path(self.path) as tmp:
                torch.save({"format": FORMAT, "epoch": len(rows) - 1, MONITOR: _plain(rows[-1][MONITOR]),
                            "model": self.state}, tmp)

    def restore(self, learn) -> None:
        """Put the kept epoch's weights into `learn`'s model (nothing when no epoch had a finite MONITOR)."""
        from fastai.torch_core import get_model
        if self.state is not None:
            get_model(learn.model).load_state_dict(self.state)
