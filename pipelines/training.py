"""lr_find (plot + csv), training (fastai fine_tune or fit_one_cycle) with a per-epoch history and checkpoints,
resume, and the whole `fit` of a run: images or audio (a pretrained backbone) or a table (`target` given:
fastai's TabularModel)."""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.torch_core import find_bs

from .audio import MelConfig
from .backbones import WithReference, create_body, get_spec
from .checkpoints import CHECKPOINT, CONFIG, Checkpoint, load_checkpoint, restore
from .distributed import is_main
from .errors import ItfitsError, ItfitsWarning
from .images import ImagePreprocessing
from .io import write_json, write_table
from .learners import OUTLIER_WEIGHT, OutlierExposureLoss
from .unknown import DEFAULT_SCORE, TABLE_DEFAULT_SCORE, UnknownStats, calibrate, crossfit_reference_scores

LR_SUGGESTIONS = ("minimum", "steep", "valley", "slide")
CHOSEN_SUGGESTION = "minimum"  # lr at the loss minimum / 10 (fastai's lr_min): valley (4e-4) trained
# Fashion-MNIST to 0.71 test accuracy in bench/unknown_scores.py settings, minimum (2.8e-3) to 0.85, steep (6e-3) 0.79


@dataclass
class FitConfig:
    data: str  # folder of class sub-folders, folder with train/ valid/, or a path,label table
    out: str = "runs/itfits"  # the run folder
    arch: str = "efficientnet_lite0"  # a name from `itfits backbones`
    weights: str = "auto"  # auto | hub | none | path to .safetensors/.pth
    epochs: int = 5  # unfrozen epochs of fine_tune
    freeze_epochs: int = 1  # head-only epochs first
    lr: float | None = None  # None: run lr_find and use its CHOSEN_SUGGESTION (minimum)
    bs: int | None = None  # None: chosen from the data size
    size: int | None = None  # None: the backbone's pretrained input size
    valid_pct: float = 0.2  # share of each class held out when the data has no split
    seed: int = 42
    threshold: str | float = "auto"  # auto: chosen on validation data to accept `keep` of correct items
    keep: float = 0.95  # share of correctly classified validation items the auto threshold accepts
    score: str | None = None  # unknown score; None: best on --unknown examples if given, else the default
    unknown: str | None = None  # folder of examples of none of the classes: they choose the score and threshold
    outlier_exposure: bool = False  # also train on the --unknown examples, towards uniform class probabilities
    num_workers: int | None = None  # None: images.loader_workers (none on CPU-only machines of <= 4 cores; audio rendering: every core)
    lr_find_iters: int = 100
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto: bf16/fp16 on GPUs, bf16 on CPUs where it is faster
    accum: int = 1  # micro-batches of `bs` per optimizer step: the lr applies to the batch of bs x accum
    ema: bool = False  # validate and save an exponential moving average of the weights
    ema_decay: float | None = None  # None: chosen from the steps of each fit (averages about the last 10%)
    compile: bool = False  # torch.compile the model; falls back to eager with a warning
    resume: bool = False  # continue the run in `out` from its last checkpoint (RUN/checkpoints)
    mel: MelConfig | None = None  # audio DATA: how clips become spectrograms; None: MelConfig() defaults (duration:
    # None, "auto", chosen from the clips' lengths; what was chosen is in run.json's resolved.mel and the bundle)
    target: str | None = None  # tabular: the column to predict; None: DATA holds images
    cat: list[str] | None = None  # tabular: columns to treat as categorical; None: inferred
    cont: list[str] | None = None  # tabular: columns to treat as continuous; None: inferred
    ignore: list[str] | None = None  # tabular: columns not to use (ids, leaks)
    layers: list[int] | None = None  # tabular: hidden layer sizes; None: [200, 100] as fastai's tabular_learner


class History(Callback):
    """One row per epoch over every fit of the Learner (fine_tune runs two: frozen, then unfrozen), continuing
    `rows` of a resumed run. images: training images this process saw (its shard in data-parallel runs);
    images_per_s: those per second of the epoch's training part."""
    order = Recorder.order + 1  # after Recorder has written this epoch's log

    def __init__(self, rows: list[dict] | None = None):
        self.rows = list(rows or [])

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
        phase = "frozen" if self.opt.frozen_idx else "unfrozen"
        self.rows.append({"epoch": len(self.rows), "phase": phase, **row,
                          "seconds": round(time.perf_counter() - self.start, 2), "images": self.images,
                          "images_per_s": round(self.images / max(self.train_seconds, 1e-9), 2)})


def best_epoch(losses: list) -> int | None:
    """Index of the first lowest finite loss, or None when none is finite."""
    finite = [(v, i) for i, v in enumerate(losses) if v is not None and np.isfinite(v)]
    return min(finite)[1] if finite else None


class KeepBest(Callback):
    """Puts back the weights of the epoch with the lowest validation loss when the fit ends (fastai's
    SaveModelCallback on valid_loss, in memory: a tabular model is small). Once a small table is learnt, further
    epochs overfit it: the validation loss rises while the training loss falls."""
    order = Recorder.order + 1  # after Recorder has this epoch's valid loss

    def before_fit(self):
        self.losses, self.state = [], None

    def after_epoch(self):
        self.losses.append(float(self.recorder.values[-1][self.recorder.metric_names[1:].index("valid_loss")]))
        if best_epoch(self.losses) == len(self.losses) - 1:
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def after_fit(self):
        if self.state is not None:
            self.model.load_state_dict(self.state)


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
    from fastai.callback.schedule import minimum, slide, steep, valley
    tmp_dir = Path(learn.path) / learn.model_dir  # fastai's lr_find keeps the weights there meanwhile
    made_tmp_dir = not tmp_dir.exists()
    loss = learn.loss_func
    if isinstance(loss, OutlierExposureLoss):  # the suggestions read the loss of the classes' items alone: the
        # outlier term rises as the model learns the classes, and the loss's minimum came in the first steps
        learn.loss_func = OutlierExposureLoss(loss.n_classes, weight=0)  # (minimum 7.6e-8 on the suite's icons)
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
        from .reports import plot_lr_find
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
          resume: dict | None = None, checkpoint_meta: dict | None = None, fine_tune: bool = True) -> pl.DataFrame:
    """fastai fine_tune: `freeze_epochs` on the head, then `epochs` unfrozen, one-cycle. Returns the history.
    With `checkpoints` (a folder), each epoch ends by writing checkpoints/last.pt; with `resume` (such a checkpoint,
    see checkpoints.load_checkpoint) training continues after its epoch, in its phase, at its one-cycle position.
    With an EMA callback on the Learner, the model ends with the EMA weights. fine_tune=False (a table: no
    pretrained body): one fit_one_cycle of `epochs`, no checkpoints, ending with the weights of the epoch of lowest
    validation loss (`KeepBest`)."""
    import fastai.callback.schedule  # noqa: F401  fastai @patches fine_tune/fit_one_cycle onto Learner here
    from .learners import find_ema, uncompile
    if not fine_tune:
        history = History()
        learn.fit_one_cycle(epochs, lr, cbs=[history, KeepBest()])
        table = pl.DataFrame(history.rows).drop("phase").rename({"images": "rows", "images_per_s": "rows_per_s"})
        return _check_finite(table, lr, row=best_epoch(table["valid_loss"].to_list()))
    history = History(resume["history"] if resume else None)
    done = resume["epoch"] if resume else 0  # epochs finished over both phases
    first = 0  # this phase's first epoch, counted over both phases
    for phase in fine_tune_phases(epochs=epochs, lr=lr, freeze_epochs=freeze_epochs):
        if phase.epochs == 0 or done >= first + phase.epochs:
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
        cbs = [history]
        if checkpoints is not None:
            cbs.append(Checkpoint(Path(checkpoints) / CHECKPOINT, first_epoch=first, history=history,
                                  meta=checkpoint_meta or {}, smooth_loss=smooth_loss, accum_count=accum_count))
        # start_epoch: fastai's SkipToEpoch skips the epochs done; pct_train, and so the one-cycle, starts there
        learn.fit_one_cycle(phase.epochs, phase.lr, start_epoch=max(0, done - first), cbs=cbs, **dict(phase.kwargs))
        first += phase.epochs
    ema = find_ema(learn)
    if resume is not None:  # every epoch was done (killed before the bundle was written): the checkpoint's weights
        from fastai.torch_core import get_model
        get_model(learn.model).load_state_dict(resume["ema"]["model"] if ema is not None and resume.get("ema")
                                               else resume["model"])
    elif ema is not None and getattr(learn, "model_ema", None) is not None:
        learn.model.load_state_dict(learn.model_ema.state_dict())  # calibration and the bundle use the EMA weights
    uncompile(learn.model)
    return _check_finite(pl.DataFrame(history.rows), lr)


def _check_finite(history: pl.DataFrame, lr: float, *, row: int | None = -1) -> pl.DataFrame:
    """The history of a training whose losses at `row` (the epoch whose weights are kept; default the last) are
    numbers; a diverged one (inf, NaN) is an ItfitsError, so no run saves a model that predicts NaN."""
    last = {k: history[k][-1 if row is None else row] for k in ("train_loss", "valid_loss") if k in history.columns}
    if not all(v is not None and np.isfinite(v) for v in last.values()):
        raise ItfitsError(f"training diverged ({', '.join(f'{k} {v}' for k, v in last.items())} after epoch "
                          f"{history.height}); no model saved. Train with a lower --lr than {lr:.2e}")
    return history


@dataclass(frozen=True)
class Prepared:
    """The data of a run, ready for a Learner: images, or audio clips rendered to spectrogram images."""
    files: pl.DataFrame  # one row per input file: path, label, split, error (set for skipped files)
    classes: list[str]
    prep: ImagePreprocessing
    bs: int
    dls: object  # fastai DataLoaders over the images the Learner sees (audio: one per window of a clip)
    mel: MelConfig | None = None  # audio only: the rendering, stored in the bundle
    n_outliers: int = 0  # --outlier-exposure: training items of none of the classes (audio: windows)


def prepare_data(config: FitConfig, run: Path, log=print) -> Prepared:
    """Read, check (audio: render) and split config.data; skipped files listed in run/skipped.csv."""
    from .backbones import get_spec
    from .images import choose_batch_size, image_dataloaders
    from .sources import AUDIO_EXTS, IMAGE_EXTS, check_image, detect_modality, has_files, read_source, require_classes

    spec = get_spec(config.arch)  # fail on a wrong name before reading any file
    mel = None
    if detect_modality(config.data) == "audio":  # clips -> window images, each window in its clip's split
        from .audio import auto_duration, render_folder, source_files
        files = read_source(config.data, exts=AUDIO_EXTS, valid_pct=config.valid_pct, seed=config.seed)
        mel, line = auto_duration(config.mel or MelConfig(), files.filter(pl.col("error").is_null())["path"].to_list())
        if line:
            log(line)
        items = render_folder(files, mel, workers=None if config.num_workers is None else max(1, config.num_workers))
        files = source_files(items)
        log(f"{files['error'].is_null().sum()} clips -> {items['error'].is_null().sum()} mel-spectrogram windows "
            f"({items['cached'].sum()} of them from the cache)")
    elif config.mel is not None:
        raise ItfitsError(f"mel options (--n-mels, --duration, ...) are for audio, and {config.data} holds images")
    else:
        files = items = read_source(config.data, valid_pct=config.valid_pct, seed=config.seed, check=check_image)
    if config.unknown and not has_files(Path(config.unknown), AUDIO_EXTS if mel else IMAGE_EXTS):  # before training
        raise ItfitsError(f"--unknown {config.unknown} holds no {'audio' if mel else 'image'} files; it takes examples "
                          f"of the same kind as DATA, {config.data}")
    outliers = outlier_items(config, mel, log) if config.outlier_exposure else None
    if is_main():  # data-parallel runs: rank 0 alone writes the run folder
        write_table(files.filter(pl.col("error").is_not_null()).select("path", "label", "error"), run / "skipped.csv")
    classes = require_classes(files)
    prep = ImagePreprocessing(size=config.size or spec.input_size, mean=spec.mean, std=spec.std)
    n_train = items.filter(pl.col("error").is_null() & (pl.col("split") == "train")).height
    bs = config.bs or choose_batch_size(n_train)
    # no flips, rotations or warps on spectrograms: time runs one way and a frequency has one height
    dls = image_dataloaders(items, classes=classes, prep=prep, bs=bs, augment=mel is None, num_workers=config.num_workers,
                            outliers=outliers)
    return Prepared(files=files, classes=classes, prep=prep, bs=bs, dls=dls, mel=mel,
                    n_outliers=0 if outliers is None else outliers.height)


def outlier_items(config: FitConfig, mel: MelConfig | None, log=print) -> pl.DataFrame:
    """The usable --unknown files as training items of no class (`--outlier-exposure`), audio rendered to windows."""
    from .images import OUTLIER
    from .sources import AUDIO_EXTS, IMAGE_EXTS, check_files, expand_inputs
    paths = [p for p, err in expand_inputs([config.unknown], AUDIO_EXTS if mel else IMAGE_EXTS) if err is None]
    items = pl.DataFrame({"path": paths, "label": OUTLIER, "split": "train", "error": None},
                         schema={"path": pl.String, "label": pl.String, "split": pl.String, "error": pl.String})
    if mel is not None:
        from .audio import render_folder
        items = render_folder(items, mel, workers=None if config.num_workers is None else max(1, config.num_workers))
    else:
        items = check_files(items)
    items = items.filter(pl.col("error").is_null())
    log(f"outlier exposure: {items.height} --unknown {'windows' if mel else 'files'} join training as none of the "
        f"classes (loss: cross-entropy to uniform class probabilities, weight {OUTLIER_WEIGHT})")
    return items


IMAGE_ONLY = ("arch", "weights", "size", "freeze_epochs", "precision", "accum", "ema", "ema_decay", "compile", "mel")


def check_table_config(config: FitConfig) -> None:
    """An ItfitsError naming the image/audio settings given for a table: fastai's tabular model has no backbone,
    image size, fine_tune phases or training controls, and ignoring them would leave run.json saying, e.g.,
    `ema: true` of a training without one."""
    defaults = {f.name: f.default for f in fields(FitConfig)}
    given = [("--duration, --n-mels, ... (audio)" if n == "mel" else "--" + n.replace("_", "-"))
             for n in IMAGE_ONLY if getattr(config, n) != defaults[n]]
    if given:
        raise ItfitsError(f"{', '.join(given)}: for images and audio only; a table (--target {config.target}) "
                          "trains fastai's tabular model, which would ignore them. Leave them out")


def prepare_tabular(config: FitConfig, run: Path):
    """(TabularData, bs, learner) for a tabular run (fit and lr-find); skipped rows listed in run/skipped.csv, the
    first file written into `run`: a table that fails its checks leaves no run folder."""
    from fastai.torch_core import set_seed
    from .images import choose_batch_size
    from .learners import tabular_learner
    from .tabular import TabularModelSpec, prepare_table, tabular_dataloaders

    check_table_config(config)
    data = prepare_table(config.data, target=config.target, cat=config.cat or (), cont=config.cont or (),
                         ignore=config.ignore or (), valid_pct=config.valid_pct, seed=config.seed)
    write_table(data.skipped, run / "skipped.csv")
    bs = config.bs or choose_batch_size(int((~data.valid).sum()), largest=1024)
    set_seed(config.seed)
    from fastai.torch_core import default_device
    dls = tabular_dataloaders(data, bs=bs, device=default_device())  # fastai's default; None kept it on the CPU
    learn = tabular_learner(dls, TabularModelSpec.for_data(data.prep, config.layers), path=run,
                            regression=data.prep.task == "regression", target_std=data.prep.target_std)
    return data, bs, learn


def run_lr_find(config: FitConfig) -> tuple[float, dict[str, float]]:
    """`itfits lr-find`: lr_find.png / lr_find.csv in config.out, and the suggestions: those `fit` finds with the
    same settings (seeded in the same places, in the precision fit resolves)."""
    from fastai.torch_core import set_seed
    from .learners import image_learner
    from .precision import resolve_precision
    run = Path(config.out)
    if config.target is not None:
        learn = prepare_tabular(config, run)[2]
    else:
        set_seed(config.seed)  # as train_images: the DataLoaders draw their shuffling seed when they are made
        data = prepare_data(config, run)
        precision = resolve_precision(config.precision, arch=config.arch, size=data.prep.size)
        set_seed(config.seed)
        learn = image_learner(data.dls, config.arch, weights=config.weights, path=run, precision=precision)
    return find_lr(learn, run, num_it=config.lr_find_iters)


def _calibrate(config: FitConfig, n_classes: int, *, valid: tuple, train: tuple, unknown: tuple | None,
               head_dim: int, default_score: str, ref_dim: int = 0):
    """calibrate() on (logits, features, targets) of the validation set, (features, targets) of training items
    and optional (logits, features) of unknown examples, with the config's score, threshold and keep.
    `head_dim`, `ref_dim`: how many feature columns are the head's and the reference body's (see unknown.py)."""
    stats = UnknownStats.fit(train[0], train[1], n_classes, head_dim=head_dim, ref_dim=ref_dim, seed=config.seed)
    known = {"pretrained_mahalanobis": crossfit_reference_scores(train[0][:, -ref_dim:], train[1], n_classes,
                                                                 seed=config.seed)} if ref_dim else None
    u_logits, u_feats = unknown if unknown is not None else (None, None)
    threshold = None if config.threshold == "auto" else float(config.threshold)
    return calibrate(valid[0], valid[2], valid[1], stats, keep=config.keep, score=config.score, threshold=threshold,
                     unknown_logits=u_logits, unknown_features=u_feats, default_score=default_score,
                     known_scores=known)


def calibrate_images(model, items: pl.DataFrame, classes: list[str], prep, config: FitConfig, *, mel: MelConfig | None = None,
                     max_train: int = 4096, precision=None):
    """Temperature, unknown score and threshold from the validation set, feature statistics from (up to
    `max_train`) training items, score choice from config.unknown examples when given. With `mel`, items are
    audio clips and each clip's outputs are the mean over its windows, exactly as prediction computes them.
    `precision`: the training's (a precision.Precision), so image outputs match the Learner's validation.
    `model`: the fine-tuned model, or backbones.WithReference of it and its pretrained body.
    Returns (Calibration, report, validation outputs {logits, features, targets, paths})."""
    from .predict import file_outputs, unknown_outputs
    from .sources import AUDIO_EXTS, IMAGE_EXTS

    fast = {"precision": precision, "channels_last": get_spec(config.arch).channels_last}

    def outputs(paths):
        return file_outputs(model, prep, paths, mel=mel, num_workers=config.num_workers, **fast)

    ok = items.filter(pl.col("error").is_null())
    index = {c: i for i, c in enumerate(classes)}
    valid = ok.filter(pl.col("split") == "valid")
    train = ok.filter(pl.col("split") == "train")
    train = train.sample(min(max_train, train.height), seed=config.seed) if train.height > max_train else train
    v_logits, v_feats, _ = outputs(valid["path"].to_list())
    _, t_feats, _ = outputs(train["path"].to_list())
    v_targets = np.array([index[c] for c in valid["label"]])
    core = model.model if isinstance(model, WithReference) else model
    head_dim = core[1][-1].in_features
    # the reference is the same architecture: its last-stage input is as wide as the model's own
    ref_dim = (v_feats.shape[1] - head_dim) // 2 if isinstance(model, WithReference) else 0
    unknown = None
    if config.unknown:
        u_logits, u_feats, unreadable = unknown_outputs(model, prep, config.unknown, AUDIO_EXTS if mel else IMAGE_EXTS,
                                                        mel=mel, num_workers=config.num_workers, **fast)
        if unreadable:  # left out, as unreadable files of DATA are
            path, error = unreadable[0]
            warnings.warn(f"--unknown {config.unknown}: {len(unreadable)} of its {len(unreadable) + len(u_logits)} "
                          f"files could not be read and were left out (the first, {path}: {error})", ItfitsWarning)
        unknown = (u_logits, u_feats)
    calibration, report = _calibrate(config, len(classes), valid=(v_logits, v_feats, v_targets),
                                     train=(t_feats, np.array([index[c] for c in train["label"]])), unknown=unknown,
                                     head_dim=head_dim, ref_dim=ref_dim, default_score=DEFAULT_SCORE)
    return calibration, report, {"logits": v_logits, "features": v_feats, "targets": v_targets,
                                 "paths": valid["path"].to_list()}


def _choose_lr(learn, config: FitConfig, run: Path, log) -> tuple[float, dict[str, float] | None]:
    """config.lr, or lr_find's chosen suggestion (plot and table written into the run folder)."""
    if config.lr is not None:
        return config.lr, None
    lr, suggestions = find_lr(learn, run, num_it=config.lr_find_iters)
    log(_lr_line(lr, suggestions, run))
    return lr, suggestions


def _lr_line(lr: float, suggestions: dict[str, float], run: Path) -> str:
    return ("lr_find suggestions: " + ", ".join(f"{k} {v:.2e}" for k, v in suggestions.items())
            + f"; using {CHOSEN_SUGGESTION} {lr:.2e} (plot: {run / 'lr_find.png'})")


def _calibration_line(calibration, report: dict) -> str:
    return (f"temperature {calibration.temperature:.2f} (valid ECE {report['valid_ece']['before']:.3f} -> "
            f"{report['valid_ece']['after']:.3f}); unknown score {calibration.score}, threshold "
            f"{calibration.threshold:.4g} ({report.get('score_chosen_by', 'given')})")


@dataclass(frozen=True)
class TrainedImages:
    """What `train_images` hands to `finish_images`: the trained Learner and what the run resolved."""
    learn: object  # fastai Learner, its model holding the final (EMA, where on) weights
    items: pl.DataFrame  # one row per input file (audio: per clip)
    classes: list[str]
    prep: object  # images.ImagePreprocessing
    history: pl.DataFrame
    resolved: dict  # lr, bs, precision, ... for run.json
    precision: object  # precision.Precision the training ran in
    started: float  # time.perf_counter() at the start
    mel: MelConfig | None = None  # audio runs: the rendering


def write_run_config(config: FitConfig, run: Path) -> None:
    """RUN/checkpoints/config.json: the settings `--resume RUN` continues with, DATA and --unknown as absolute
    paths (a resume may start in another folder)."""
    absolute = {k: str(Path(v).resolve()) for k in ("data", "unknown") if (v := getattr(config, k))}
    write_json({**asdict(config), **absolute, "resume": False}, run / "checkpoints" / CONFIG)


def resume_config(run: Path | str) -> FitConfig:
    """The FitConfig of the run in folder `run`, set to resume it there (wherever the run was first written: a
    moved or copied run folder resumes where it is)."""
    from .checkpoints import read_run_config
    stored = read_run_config(Path(run))
    known = {f.name for f in fields(FitConfig)}
    config = FitConfig(**{**{k: v for k, v in stored.items() if k in known}, "out": str(run), "resume": True})
    if isinstance(config.mel, dict):  # stored as JSON
        config.mel = MelConfig.from_json(config.mel)
    return config


def train_images(config: FitConfig, *, log=print) -> TrainedImages:
    """`itfits fit` up to the trained Learner: data, a Learner with the training controls, lr_find, fine_tune with
    a checkpoint at each epoch end, or the rest of an interrupted run (config.resume). In data-parallel runs every
    process calls it (inside distributed.process_group()); rank 0 alone writes into the run folder."""
    from fastai.callback.progress import ProgressCallback
    from fastai.torch_core import set_seed
    from .distributed import DataParallel, broadcast_object, world_size
    from .learners import check_accumulation, effective_batch, find_ema, image_learner
    from .precision import resolve_precision

    t0 = time.perf_counter()
    run = Path(config.out)
    main = is_main()
    state = load_checkpoint(run) if config.resume else None
    total = config.freeze_epochs + config.epochs
    if state is not None and state["epoch"] >= total and (run / "model").is_dir():
        raise ItfitsError(f"{run} has finished all {total} epochs; nothing to resume. Its bundle is {run / 'model'}")
    if main:
        run.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)  # the DataLoaders draw their shuffling seed from python's random when they are made
    data = prepare_data(config, run, log)
    # data-parallel: each process steps on its shard, about 1/world of the batches
    check_accumulation(accum=config.accum, batches=len(data.dls.train) // world_size(), bs=data.dls.train.bs,
                       phase_epochs=[config.freeze_epochs, config.epochs])
    if main and state is None:  # after the data checks: a run that failed on its data is no run to resume
        write_run_config(config, run)
    items, classes, prep, bs, dls = data.files, data.classes, data.prep, data.bs, data.dls
    n_skipped = items["error"].is_not_null().sum()
    world = world_size()
    log(f"{items.height - n_skipped} files in {len(classes)} classes "
        f"({len(dls.train_ds)} train, {len(dls.valid_ds)} valid{' windows' if data.mel else ''}); {n_skipped} skipped"
        + (f", listed in {run / 'skipped.csv'}" if n_skipped else "")
        + f"; batch size {bs}{' (chosen from the data size)' if config.bs is None else ''}"
        + (f" x {config.accum} accumulated" if config.accum > 1 else "")
        + (f" x {world} processes" if world > 1 else "")
        + (f" = {effective_batch(bs, config.accum, world)} per step" if config.accum > 1 or world > 1 else "")
        + f", size {prep.size}")
    # a resumed run keeps the precision it started with: the CPU probe could choose otherwise today
    precision = resolve_precision(state["precision"] if state else config.precision, arch=config.arch, size=prep.size)
    log(f"precision {precision.name} ({precision.reason})")
    set_seed(config.seed)
    learn = image_learner(dls, config.arch, weights=config.weights, path=run, precision=precision, accum=config.accum,
                          ema=config.ema, ema_decay=config.ema_decay, compile=config.compile)
    if not main:  # one progress bar and log, from rank 0
        learn.remove_cb(ProgressCallback)
        learn.logger = lambda *a, **k: None
    lr, suggestions = config.lr, None
    if state is not None:
        lr, suggestions = state["lr"], state.get("lr_suggestions")
        log(f"resuming {run} after epoch {state['epoch']} of {total}" if state["epoch"] < total else
            f"{run} trained all {total} epochs but stopped before its bundle was written: finishing it")
    elif lr is None:
        # with --accum, lr_find's iterations are micro-batches: N x as many make its usual number of steps, so
        # the suggestion is an lr for the effective batch
        lr, suggestions = find_lr(learn, run if main else None, num_it=config.lr_find_iters * config.accum)
        lr, suggestions = broadcast_object((lr, suggestions))  # every process trains with rank 0's choice
        log(_lr_line(lr, suggestions, run))
    if world > 1:
        learn.add_cb(DataParallel())
    history = train(learn, epochs=config.epochs, lr=lr, freeze_epochs=config.freeze_epochs,
                    checkpoints=run / "checkpoints", resume=state,
                    checkpoint_meta={"lr": lr, "lr_suggestions": suggestions, "precision": precision.name})
    if main:
        write_table(history, run / "history.csv")
    ema, compiler = find_ema(learn), next((cb for cb in learn.cbs if type(cb).__name__ == "TorchCompile"), None)
    resolved = {"lr": lr, "lr_suggestions": suggestions, "bs": bs, "accum": config.accum,
                "effective_bs": effective_batch(bs, config.accum, world), "size": prep.size, "classes": classes,
                "n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds), "n_skipped": int(n_skipped),
                "precision": precision.json(),
                "channels_last": any(type(cb).__name__ == "ChannelsLast" for cb in learn.cbs),
                "ema_decay": float(ema.final_decay) if ema is not None else None,
                "compiled": bool(compiler and not compiler.failed),
                "compile_error": compiler.failed if compiler else None,
                "num_workers": dls.train.fake_l.num_workers,  # fastai keeps the process count there
                "world_size": world, "resumed_after_epoch": state["epoch"] if state else None,
                "n_outlier_exposure": data.n_outliers,
                **({"mel": data.mel.json()} if data.mel else {})}
    return TrainedImages(learn=learn, items=items, classes=classes, prep=prep, history=history, resolved=resolved,
                         precision=precision, started=t0, mel=data.mel)


def finish_images(trained: TrainedImages, config: FitConfig, *, log=print) -> dict:
    """Calibration, confusion matrix, the bundle and run.json of a trained run (rank 0's work). Returns run.json."""
    from .bundle import image_bundle_meta, save_bundle
    from .reports import Validation, guarded, write_report

    run, learn, classes, history = Path(config.out), trained.learn, trained.classes, trained.history
    # the pretrained body training started from, unchanged: the default unknown score works on its features
    reference = create_body(get_spec(config.arch), weights=config.weights)[0].to(next(learn.model.parameters()).device)
    calibration, calib_report, valid = calibrate_images(WithReference(learn.model, reference), trained.items, classes,
                                                        trained.prep, config, mel=trained.mel,
                                                        precision=trained.precision)
    preds = valid["logits"].argmax(1)
    accuracy = float((preds == valid["targets"]).mean())
    log(_calibration_line(calibration, calib_report))

    summary = {
        "config": asdict(config),
        "resolved": {**trained.resolved, **({"n_valid_clips": len(valid["targets"])} if trained.mel else {})},
        "results": {"valid_accuracy": accuracy, "valid_loss": float(history["valid_loss"][-1]),
                    "seconds": round(time.perf_counter() - trained.started, 1)},
        "calibration": calib_report,
    }
    meta = image_bundle_meta(config.arch, classes, trained.prep,
                             training={**summary["results"], "precision": trained.precision.name}, mel=trained.mel)
    save_bundle(learn.model, meta, calibration, run / "model", reference=reference)
    write_json(summary, run / "run.json")
    probs, scores, _ = calibration.apply(valid["logits"], valid["features"])
    images = valid["paths"]
    if trained.mel:  # a clip's picture: its first window's spectrogram, rendered for training (in the cache)
        first_window = dict(trained.items.select("path", "image").iter_rows())
        images = [first_window[p] for p in valid["paths"]]
    # the bundle and run.json are written: nothing after this may fail the run (reports.guarded)
    report = guarded([], "report.html", write_report, run, summary, history, Validation(
        logits=valid["logits"], targets=valid["targets"], names=valid["paths"], probs=probs, scores=scores,
        images=images))
    log(f"valid accuracy {accuracy:.3f}; model bundle in {run / 'model'}; report: {report or 'not written'}")
    return summary


def fit(config: FitConfig, log=print) -> dict:
    """`itfits fit`: train on config.data and write the run folder. Returns the run summary (run.json).
    Under `accelerate launch` / `torchrun`, every process trains its shard; rank 0 returns the summary, the
    others an empty dict. With config.target, a table: `fit_table`."""
    if config.target is not None:
        return fit_table(config, log)
    from .distributed import process_group
    with process_group():
        trained = train_images(config, log=log if is_main() else (lambda *a, **k: None))
        return finish_images(trained, config, log=log) if is_main() else {}


def unknown_rows(config: FitConfig, prep) -> pl.DataFrame | None:
    """The usable rows of config.unknown (a table of examples of none of the classes), parsed; read before
    training, so that a wrong table fails in seconds, not after the training."""
    if not config.unknown:
        return None
    if prep.task == "regression":
        raise ItfitsError(f"--unknown is for classification; '{prep.target}' holds numbers (regression), which "
                          "flags no unknowns")
    _, parsed, errors = prep.read_rows(config.unknown)
    parsed = parsed.filter(errors.is_null())
    if parsed.height == 0:
        raise ItfitsError(f"--unknown {config.unknown}: no usable rows")
    return parsed


def calibrate_table(model, data, config: FitConfig, *, unknown: pl.DataFrame | None = None, max_train: int = 4096):
    """As calibrate_images, for a table: temperature, score and threshold from the validation rows, feature
    statistics from (up to `max_train`) training rows, score choice from `unknown` (rows of none of the classes,
    from `unknown_rows`) when given. Returns (Calibration, report, validation logits, features)."""
    from .tabular import tabular_outputs
    t_cat, t_cont, t_y = data.part(False)
    if len(t_y) > max_train:
        keep = np.random.default_rng(config.seed).choice(len(t_y), max_train, replace=False)
        t_cat, t_cont, t_y = t_cat[keep], t_cont[keep], t_y[keep]
    v_cat, v_cont, v_y = data.part(True)
    v_logits, v_feats = tabular_outputs(model, v_cat, v_cont)
    if unknown is not None:
        unknown = tabular_outputs(model, *data.prep.encode(unknown))
    calibration, report = _calibrate(config, len(data.prep.classes), valid=(v_logits, v_feats, v_y),
                                     train=(tabular_outputs(model, t_cat, t_cont)[1], t_y), unknown=unknown,
                                     head_dim=v_feats.shape[1],  # tabular features are the head's only
                                     default_score=TABLE_DEFAULT_SCORE)
    return calibration, report, v_logits, v_feats


def _regression_results(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Validation RMSE, MAE and R² in the target's units."""
    err = pred - truth
    return {"valid_rmse": float(np.sqrt((err ** 2).mean())), "valid_mae": float(np.abs(err).mean()),
            "valid_r2": float(1 - (err ** 2).sum() / max(((truth - truth.mean()) ** 2).sum(), 1e-12))}


def fit_table(config: FitConfig, log=print) -> dict:
    """`itfits fit TABLE --target COLUMN`: fastai's TabularModel trained with fit_one_cycle; writes the run folder
    as `fit` does for images. Returns the run summary (run.json)."""
    from .bundle import save_bundle, tabular_bundle_meta
    from .reports import Validation, guarded, write_report
    from .sources import read_table
    from .tabular import TabularModelSpec, tabular_outputs

    t0 = time.perf_counter()
    run = Path(config.out)
    data, bs, learn = prepare_tabular(config, run)
    prep, n_skipped = data.prep, data.skipped.height
    unknown = unknown_rows(config, prep)
    classify = prep.task == "classification"
    log(f"{data.n_rows} rows: {len(learn.dls.train_ds)} train, {len(learn.dls.valid_ds)} valid, {n_skipped} skipped"
        + (f" (listed in {run / 'skipped.csv'})" if n_skipped else "")
        + f"; batch size {bs}{' (chosen from the data size)' if config.bs is None else ''}")
    log(f"{prep.task} of '{prep.target}'" + (f" into {len(prep.classes)} classes" if classify else "")
        + f"; categorical: {', '.join(prep.cat) or 'none'}; continuous: {', '.join(prep.cont) or 'none'}"
        + (f"; missing-value flags for: {', '.join(prep.na)}" if prep.na else ""))
    for note in data.notes:
        log(f"note: {note}")
    lr, suggestions = _choose_lr(learn, config, run, log)
    history = train(learn, epochs=config.epochs, lr=lr, fine_tune=False)
    write_table(history, run / "history.csv")
    kept = best_epoch(history["valid_loss"].to_list())  # the epoch whose weights train() kept
    if kept != history.height - 1:
        log(f"kept the weights of epoch {kept} (validation loss {history['valid_loss'][kept]:.4f}, the lowest; "
            f"{history['valid_loss'][-1]:.4f} after the last)")

    v_rows = data.rows[data.valid]
    rows = read_table(Path(config.data))[v_rows.tolist()]  # the validation rows as the file has them
    calibration = calib_report = None
    if classify:
        calibration, calib_report, v_logits, v_feats = calibrate_table(learn.model, data, config, unknown=unknown)
        v_y, preds = data.y[data.valid], v_logits.argmax(1)
        results = {"valid_accuracy": float((preds == v_y).mean())}
        log(_calibration_line(calibration, calib_report))
        probs, scores, _ = calibration.apply(v_logits, v_feats)
        outputs = dict(logits=v_logits, targets=v_y, probs=probs, scores=scores)
    else:
        v_cat, v_cont, _ = data.part(True)
        v_pred = prep.decode_target(tabular_outputs(learn.model, v_cat, v_cont)[0][:, 0])
        v_true = rows[prep.target].cast(pl.Float64).to_numpy()  # exact: data.y holds it normalised, in float32
        results = _regression_results(v_pred, v_true)
        outputs = dict(predictions=v_pred, targets=v_true)
    results.update(valid_loss=float(history["valid_loss"][kept]), seconds=round(time.perf_counter() - t0, 1))
    spec = TabularModelSpec.for_data(prep, config.layers)
    summary = {
        "config": asdict(config),
        "resolved": {"lr": lr, "lr_suggestions": suggestions, "bs": bs, "task": prep.task, "classes": prep.classes,
                     "cat": prep.cat, "cont": prep.cont, "na_flags": prep.na, "dates": prep.dates,
                     "ignore": prep.ignore, "kept_epoch": kept, "layers": list(spec.layers),
                     "emb_szs": spec.json()["emb_szs"], "n_rows": data.n_rows, "n_train": len(learn.dls.train_ds),
                     "n_valid": len(learn.dls.valid_ds), "n_skipped": n_skipped},
        "results": results,
        "calibration": calib_report,
    }
    save_bundle(learn.model, tabular_bundle_meta(prep, spec, training=results), calibration, run / "model")
    write_json(summary, run / "run.json")
    report = guarded([], "report.html", write_report, run, summary, history,
                     Validation(names=[f"row {r}" for r in v_rows], rows=rows, **outputs))
    log(", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in results.items() if k.startswith("valid_"))
        + f"; model bundle in {run / 'model'}; report: {report or 'not written'}")
    return summary
