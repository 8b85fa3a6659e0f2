"""Learner factories: a backbone from the registry (fastai loss, metrics, body/head parameter split) with the
training controls as callbacks: precision (+ channels-last), gradient accumulation, EMA, torch.compile; or
fastai's TabularModel on a preprocessed table."""
from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.optimizer import Optimizer
from fastai.torch_core import to_float
from torch.optim.adamw import adamw

from .backbones import create_backbone, freeze_stem, frozen_stem, get_spec
from .balance import balance_metrics
from .errors import ItfitsError, ItfitsWarning
from .multilabel import multilabel_fit_metrics
from .precision import Precision
from .tabular import create_tabular_model

EMA_SHARE = 0.1  # the auto EMA decay averages over about the last 10% of a fit's optimizer steps
EMA_DECAY_MAX = 0.9998  # fastxtend's and timm's usual decay, reached only on long runs
TINY_BN_BATCH = 8  # BatchNorm statistics from fewer samples than this are noisy enough to hurt


def body_head_split(model):
    """Two parameter groups, body and head: `freeze()` trains the head alone, discriminative lrs follow. A frozen
    stem (backbones.freeze_stem) is in neither: `unfreeze()` leaves it pretrained."""
    from fastai.torch_core import params
    stem = {id(p) for m in frozen_stem(model[0]) for p in m.parameters()}
    return [[p for p in model[0].parameters() if id(p) not in stem], params(model[1])]


class FrozenStem(Callback):
    """Keeps the frozen stem's BatchNorms in eval mode while the rest trains: its output stays the pretrained
    body's, which the reference body then shares at prediction."""
    order = 1  # after TrainEvalCallback's model.train()

    def before_train(self):
        from fastai.torch_core import get_model
        for module in frozen_stem(get_model(self.learn.model)[0]):
            module.eval()


class CpuAutocast(Callback):
    """bf16 autocast around the forward pass and the loss on a CPU (fastai's MixedPrecision autocasts 'cuda' only).
    bf16 has fp32's range, so no loss scaling; predictions go back to fp32 for the loss and the metrics."""
    order = MixedPrecision.order

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype, self.ctx = dtype, None

    def before_batch(self):
        self.ctx = torch.autocast("cpu", dtype=self.dtype)
        self.ctx.__enter__()

    def after_pred(self):
        self.learn.pred = to_float(self.pred)

    def after_loss(self):
        self._exit()

    def after_cancel_batch(self):  # a callback cancelled the batch before after_loss: leave autocast all the same
        self._exit()

    def _exit(self):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None


def precision_callbacks(precision: Precision, *, channels_last: bool) -> list[Callback]:
    """fastai MixedPrecision (CUDA, with loss scaling for fp16), our CpuAutocast (CPU bf16), and ChannelsLast."""
    from fastai.callback.channelslast import ChannelsLast
    cbs = [ChannelsLast()] if channels_last else []
    if precision.name == "fp32":
        return cbs
    if precision.device == "cuda":
        return cbs + [MixedPrecision(precision.name)]
    return cbs + [CpuAutocast(precision.dtype)]


def has_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def accumulation(*, accum: int, bs: int, model) -> list[Callback]:
    """fastai GradientAccumulation for `accum` micro-batches of `bs` per optimizer step (its n_acc counts samples).
    The loss is scaled so the step equals one on a batch of accum * bs: the lr is the lr of that batch."""
    from fastai.callback.training import GradientAccumulation
    if bs < TINY_BN_BATCH and has_batchnorm(model):
        way_out = (f"however large --accum makes the effective batch; use --bs {TINY_BN_BATCH} or more with fewer "
                   "--accum steps" if accum > 1 else f"use --bs {TINY_BN_BATCH} or more")
        warnings.warn(f"batches of {bs} with a BatchNorm backbone: its statistics come from each batch of {bs}, "
                      f"{way_out}, or a LayerNorm backbone (convnext_*, vit_*)", ItfitsWarning, stacklevel=2)
    return [GradientAccumulation(n_acc=accum * bs)] if accum > 1 else []


def check_accumulation(*, accum: int, batches: int, bs: int, phase_epochs: list[int]) -> None:
    """An ItfitsError where a fine_tune phase of `phase_epochs` epochs of `batches` (micro-)batches of `bs` would
    never reach `accum` batches: fastai's GradientAccumulation steps only once `accum` batches are in, so that
    phase would train nothing (and the run end with a model at chance, calibrated to temperature 20)."""
    shortest = min((e for e in phase_epochs if e > 0), default=0)
    if accum > 1 and shortest and shortest * batches < accum:
        raise ItfitsError(f"--accum {accum}: a phase of {shortest} epoch{'s' * (shortest > 1)} has only "
                          f"{shortest * batches} batches of {bs}, so the optimizer would never step; use --accum "
                          f"{max(1, shortest * batches)} or less, a smaller --bs, or more epochs")


def ema_decay_for(steps: float) -> float:
    """EMA decay that averages over about EMA_SHARE of `steps` optimizer steps, at least 2, at most EMA_DECAY_MAX.
    A constant 0.9998 over a few dozen steps leaves the EMA near its starting point."""
    return min(EMA_DECAY_MAX, 1 - 1 / max(2.0, EMA_SHARE * steps))


@functools.cache
def ema_class():
    """The EMA callback class (below). fastxtend is imported on first use, not with this module."""
    # fastxtend 0.1.7 predates fastai 2.8: callback.ema imports (test_training_controls checks), much else does not.
    # Importing it appends its LogDispatch to fastai's default callbacks, which EMASchedule logs through, so it is
    # imported before the Learner is built.
    from fastxtend.callback.ema import EMACallback, EMASchedule

    class EMA(EMASchedule):
        """fastxtend's EMASchedule (decay warmed up from `start_decay` to `final_decay` over the first `finish` of
        each fit) with the decay chosen from the run length, and fixes for fastxtend 0.1.7: a second fit works
        (0.1.7 replaces its schedule factory by the schedule it made), BatchNorm statistics follow the model (0.1.7
        pairs model buffers with themselves, and its CPU loop skips buffers), the EMA keeps updating after a step
        that gradient accumulation skipped, and its state goes into checkpoints. After each fit,
        `learn.model_ema` holds the EMA model; validation uses it."""

        def __init__(self, *, final_decay: float | None = None, start_decay: float = 0.0, finish: float = 0.3):
            # foreach (fused) updates also run on CPUs and cover floating buffers: BatchNorm running statistics
            super().__init__(start_decay=start_decay, final_decay=final_decay or EMA_DECAY_MAX, finish=finish,
                             foreach=True)
            self.auto_decay, self.pending, self.schedule_fn = final_decay is None, None, self.schedule

        def before_fit(self):
            self.schedule = self.schedule_fn  # fine_tune fits twice; fastxtend overwrote it in the first
            if self.auto_decay:
                world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                steps = self.n_epoch * len(self.dls.train) / self._accum() / world
                self.final_decay = ema_decay_for(steps)
            self.decay = self.final_decay  # fastxtend negates it in before_fit; a fit it sat out (lr_find) left it so
            super().before_fit()
            if not self.run:  # lr_find and get_preds: fastxtend turned itself off
                return
            ema_buffers = dict(self.ema_model.named_buffers())
            self.int_buffers = [(b, ema_buffers[n]) for n, b in self.learn.model.named_buffers()
                                if not torch.is_floating_point(b) and n in ema_buffers]
            self.model_buffers, self.ema_buffers = [], []  # replaced by int_buffers, copied in after_batch
            if self.pending is not None:
                self._load(self.pending)
                self.pending = None

        def after_batch(self):
            updated = self._do_ema
            if updated:
                self.decay = self.schedule_step(self.decay, self.pct_train)
                self.inverse_decay = 1 - self.decay
            EMACallback.after_batch(self)  # the update, and turning EMA back on after a skipped step
            if updated:
                with torch.no_grad():
                    for b, e in self.int_buffers:
                        e.copy_(b)

        def _accum(self) -> float:
            from fastai.callback.training import GradientAccumulation
            n_acc = next((cb.n_acc for cb in self.learn.cbs if isinstance(cb, GradientAccumulation)), None)
            return max(1.0, n_acc / self.dls.train.bs) if n_acc else 1.0

        def state_dict(self) -> dict:
            return {"model": self.ema_model.state_dict(), "decay": float(self.decay),
                    "schedule_pct": float(self.schedule_pct), "do_ema": bool(self._do_ema)}

        def _load(self, state: dict):
            self.ema_model.load_state_dict(state["model"])
            self.decay, self.schedule_pct, self._do_ema = state["decay"], state["schedule_pct"], state["do_ema"]
            self.inverse_decay = 1 - abs(self.decay)

    return EMA


def ema_callback(*, final_decay: float | None = None):
    """The EMA callback (see `ema_class`); `final_decay` None: chosen from the number of steps of each fit."""
    return ema_class()(final_decay=final_decay)


def find_ema(learn):
    """The Learner's EMA callback, or None."""
    if "fastxtend.callback.ema" not in sys.modules:  # never imported: no EMA anywhere
        return None
    return next((cb for cb in learn.cbs if isinstance(cb, ema_class())), None)


class TorchCompile(Callback):
    """torch.compile of the model, in place (`nn.Module.compile`: the state dict keeps its key names, no
    `_orig_mod.` prefix). One training step on a random batch is tried first; where compiling fails (no C
    compiler for inductor on a CPU, an unsupported platform or layer) the run goes on eagerly with a warning.
    fastxtend's compiler callback does not import with this torch."""
    order = MixedPrecision.order - 1  # after ChannelsLast and the move to the device, before EMA copies the model

    def __init__(self, *, precision: Precision | None = None, channels_last: bool = False, backend: str = "inductor",
                 mode: str | None = None):
        self.precision, self.channels_last, self.backend, self.mode = precision, channels_last, backend, mode
        self.failed = None

    def before_fit(self):
        model = self.learn.model
        if self.failed or getattr(model, "_compiled_call_impl", None) is not None:
            return
        try:
            model.compile(backend=self.backend, mode=self.mode)
            self._trial_step(model)
        except Exception as e:  # inductor, dynamo and backends raise many types; any of them means: run eagerly
            uncompile(model)
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            warnings.warn(f"--compile: torch.compile ({self.backend}) failed, training without it ({self.failed})",
                          ItfitsWarning, stacklevel=2)

    def _trial_step(self, model):
        """Forward and backward on a random batch of the training shape, with the run's autocast; the model's
        buffers (BatchNorm statistics) and gradients are put back as they were."""
        x = self.dls.valid.one_batch()[0] if len(self.dls.valid) else self.dls.train.one_batch()[0]
        x = torch.randn((self.dls.train.bs, *x.shape[1:]), device=x.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        was_training = model.training
        model.train()
        try:
            with self.precision.autocast() if self.precision else torch.autocast("cpu", enabled=False):
                out = model(x)
            out.float().sum().backward()
        finally:
            model.train(was_training)
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])


def uncompile(model) -> None:
    """Back to eager calls (nn.Module has `compile` but no inverse): prediction after training runs eagerly rather
    than compiling again for inference mode and every new batch shape."""
    model._compiled_call_impl = None


def image_learner(dls, arch: str, *, weights: str = "auto", path: Path | str = ".", precision: Precision | None = None,
                  accum: int = 1, ema: bool = False, ema_decay: float | None = None, compile: bool = False,
                  class_weights: torch.Tensor | None = None, multi_label: bool = False):
    """A fastai Learner for image classification on `dls` with the registered backbone `arch`, with the training
    controls as callbacks: `precision` (None: fp32; see precision.resolve_precision), channels-last for conv nets,
    `accum` micro-batches per step, an EMA of the weights, torch.compile; fastai's Adam, multi-tensor.
    `class_weights`: cross-entropy weights per class (balance.Balance.loss_weights). Metrics: accuracy, balanced
    accuracy and per-class recall (balance.balance_metrics). `multi_label`: one sigmoid per class, fastai's
    BCEWithLogitsLossFlat, metrics accuracy_multi and F1 (multilabel.multilabel_fit_metrics)."""
    from fastai.learner import Learner
    from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat
    from fastai.metrics import accuracy

    from .images import OUTLIER
    spec = get_spec(arch)
    exposure = dls.vocab[-1] == OUTLIER  # --outlier-exposure: the last entry is no class and has no output
    model = create_backbone(arch, num_classes=len(dls.vocab) - exposure, weights=weights)
    cbs = precision_callbacks(precision, channels_last=spec.channels_last) if precision else []
    if weights != "none" and spec.frozen_stages:  # a stem of random weights would stay random
        freeze_stem(model[0], spec.frozen_stages)
        cbs.append(FrozenStem())
    cbs += accumulation(accum=accum, bs=dls.train.bs, model=model)
    if compile:
        cbs.append(TorchCompile(precision=precision, channels_last=spec.channels_last))
    if ema:
        cbs.append(ema_callback(final_decay=ema_decay))
    classes = list(dls.vocab)[:len(dls.vocab) - exposure]
    if multi_label:
        return Learner(dls, model, loss_func=BCEWithLogitsLossFlat(), metrics=multilabel_fit_metrics(),
                       splitter=body_head_split, path=Path(path), model_dir="checkpoints", cbs=cbs, opt_func=FusedAdam)
    if class_weights is not None:  # the Learner moves the model to the data's device, not the loss
        class_weights = class_weights.to(dls.device)
    loss = (OutlierExposureLoss(len(classes), class_weights=class_weights) if exposure else
            CrossEntropyLossFlat(weight=class_weights))
    return Learner(dls, model, loss_func=loss, metrics=[accuracy, *balance_metrics(classes)], splitter=body_head_split,
                   path=Path(path), model_dir="checkpoints", cbs=cbs, opt_func=FusedAdam)


OUTLIER_WEIGHT = 0.5  # Hendrycks et al. 2019's weight of the outlier term for vision


class OutlierExposureLoss(torch.nn.Module):
    """Outlier exposure (Hendrycks, Mazeika & Dietterich 2019): cross-entropy on the items of the classes, plus
    OUTLIER_WEIGHT x the cross-entropy from the uniform distribution to the predicted one on the items of none of
    them (target == n_classes), each a mean over its own items of the batch. The model learns low confidence, and
    features apart from the classes', on what is none of them."""

    def __init__(self, n_classes: int, weight: float = OUTLIER_WEIGHT, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.n_classes, self.weight = n_classes, weight
        self.class_weights = class_weights  # --balance weights (on the data's device), or None

    def forward(self, logits, target):
        logp = torch.log_softmax(logits.float(), dim=-1)
        known = target < self.n_classes
        loss = (torch.nn.functional.nll_loss(logp[known], target[known], weight=self.class_weights) if known.any()
                else logp.sum() * 0)
        if not known.all():
            loss = loss - self.weight * logp[~known].mean()
        return loss

    def activation(self, logits):  # fastai's get_preds: probabilities
        return torch.softmax(logits, dim=-1)

    def decodes(self, logits):
        return logits.argmax(dim=-1)


class FusedAdam(Optimizer):
    """fastai's Adam (mom 0.9, sqr_mom 0.99, eps 1e-5, decoupled weight decay 0.01, none on BatchNorm and bias
    parameters as fastai marks them) stepped by PyTorch's fused AdamW kernel, one pass over each parameter per
    step: efficientnet_lite0 3.4 ms a step on 2 cores, against 9.9 for fastxtend's multi-tensor Adam and 10.8 for
    torch's default AdamW. fastai's state names (grad_avg, sqr_avg, step), so freeze/unfreeze, clear_state and
    checkpoints work as with fastai's Adam; `step` is a tensor, as the kernel wants it."""

    def __init__(self, params, lr: float, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5, wd: float = 0.01):
        super().__init__(params, [], lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("fastai optimizers do not take a closure")
        for params, hyper in zip(self.param_lists, self.hypers):
            by_wd = {True: ([], [], [], [], []), False: ([], [], [], [], [])}  # do_wd -> params, grads, states
            for p in params:
                # frozen: never stepped, though lr_find leaves zero gradients on it (fastai zeroes them, keeps
                # them) that weight decay and momentum would otherwise act on through the head-only epochs
                if p.grad is None or not p.requires_grad:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["sqr_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                elif state["grad_avg"].device != p.device or not torch.is_tensor(state["step"]):
                    # a checkpoint: loaded to the CPU before fastai moves the model to the GPU; written by fastai's
                    # Adam, a number for `step`. The fused kernel wants every state on its parameter's device.
                    state["grad_avg"], state["sqr_avg"] = state["grad_avg"].to(p.device), state["sqr_avg"].to(p.device)
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
                for values, value in zip(by_wd[state.get("do_wd", True)],
                                         (p, p.grad, state["grad_avg"], state["sqr_avg"], state["step"])):
                    values.append(value)
            for do_wd, (ps, grads, grad_avgs, sqr_avgs, steps) in by_wd.items():
                if ps:
                    adamw(ps, grads, grad_avgs, sqr_avgs, [], steps, fused=True, amsgrad=False, maximize=False,
                          beta1=hyper["mom"], beta2=hyper["sqr_mom"], lr=hyper["lr"], eps=hyper["eps"],
                          weight_decay=hyper["wd"] if do_wd else 0.0)


def effective_batch(bs: int, accum: int, world_size: int = 1) -> int:
    """Samples per optimizer step: micro-batch x accumulation steps x data-parallel processes."""
    return bs * accum * world_size


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


    if regression:
        loss, metric = MSELossFlat(), AccumMetric(partial(_rmse_in_units, scale=target_std), name="rmse")
    else:
        loss, metric = CrossEntropyLossFlat(), accuracy
    return Learner(dls, create_tabular_model(spec), loss_func=loss, metrics=metric, path=Path(path),
                   model_dir="checkpoints")
