"""A run of `itfits fit` / `itfits lr-find`: FitConfig, which checks itself, and the recipes that chain the stages
(prepare -> learner -> training -> calibration -> bundle, run.json, report) for images and audio, or a table
(`target` given: table_fit.py)."""
from __future__ import annotations

import math
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import polars as pl
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed

from .audio import MelConfig
from .balance import check_balance
from .backbones import WEIGHT_KEYWORDS, check_size, check_weights
from .features import with_reference
from .bundle import save_bundle
from .calibration import calibrate_images, calibration_line
from .check import CheckResult, check_at_fit, mislabelled_at_fit
from .checkpoints import CONFIG, MONITOR, load_checkpoint, read_run_config
from .distributed import DataParallel, broadcast_object, is_main, process_group, world_size
from .errors import ItfitsError, did_you_mean
from .feature_cache import cache_frozen_features
from .images import check_workers
from .io import write_json, write_table
from .learners import check_accumulation, effective_batch, find_ema, image_learner
from .logs import emit, verbose
from .metrics import balanced_accuracy, per_class
from .modality import Fitted, Modality, file_exts, modalities, modality_for
from .multilabel import finish_multilabel
from .precision import check_precision, resolve_precision
from .prepare import prepare_data
from .reports import Validation, guarded, write_report
from .runtime import cpu_policy, cpu_threads, current_cpu_policy
from .sources import TABLE_EXTS, has_files
from .table_fit import lr_line
from .table_learners import AUTO, check_model
from .training import best_epoch, find_lr, train
from .unknown import SCORES


@dataclass
class FitConfig:
    data: str  # folder of class sub-folders, folder with train/ valid/, or a path,label table
    out: str = "runs/itfits"  # the run folder
    arch: str = "auto"  # a name from `itfits backbones`, or auto: by the data size (backbones.auto_arch)
    weights: str = "auto"  # auto | hub | none | path to .safetensors/.pth
    epochs: int | None = None  # unfrozen epochs of fine_tune (tables: of fit_one_cycle); None: by the data size
    # (training.auto_epochs), or tabular.TABLE_EPOCHS for a table
    freeze_epochs: int = 1  # head-only epochs first
    patience: int | None = None  # stop after this many epochs without a lower validation loss; None: every epoch
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
    balance: str = "auto"  # auto | weights | sampler | none: imbalanced classes (balance.py); auto: weights past 3x
    num_workers: int | None = None  # None: images.loader_workers (none on CPU-only machines of <= 4 cores; audio rendering: every core)
    threads: int | None = None  # torch's threads; None: runtime.cpu_policy (a core each, a table one)
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
    model: str = AUTO  # tabular: nn (fastai's TabularModel), gbdt (LightGBM), or auto: both, the better on validation
    multi_label: bool = False  # images: a label cell may hold several classes (space or ';'); a path,labels table
    # is multi-label without it (multilabel.py)

    def __post_init__(self):
        """The checks `itfits fit` makes of its options, in its words, for a FitConfig made anywhere (a notebook:
        `fit(FitConfig(valid_pct=1.5))` fails here, not after reading the data)."""
        if isinstance(self.mel, dict):  # from run.json / checkpoints/config.json
            self.mel = MelConfig.from_json(self.mel)
        check_precision(self.precision)
        check_balance(self.balance)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ItfitsError(f"--ema-decay must be between 0 and 1, got {self.ema_decay}")
        self.ema = self.ema or self.ema_decay is not None  # a decay implies the EMA
        for name, value, least in [("--epochs", self.epochs, 1), ("--freeze-epochs", self.freeze_epochs, 0),
                                   ("--accum", self.accum, 1), ("--patience", self.patience, 1)]:
            if value is not None and value < least:
                raise ItfitsError(f"{name} must be at least {least}, got {value}")
        if self.bs is not None and self.bs < 2:
            raise ItfitsError(f"--bs must be at least 2, got {self.bs}: BatchNorm layers normalise each training batch "
                              "by its own statistics, which takes two or more items")
        if self.size is not None:
            check_size(self.arch, self.size)
        if self.target is None:  # a weights file that is not there fails now, not after the file checks and the probe
            check_weights(self.weights)
            if self.arch == "auto" and self.weights not in WEIGHT_KEYWORDS:
                raise ItfitsError(f"--weights {self.weights}: name the --arch whose weights the file holds "
                                  "(--arch auto chooses the backbone by the data size)")
        check_workers(self.num_workers)
        if self.threads is not None and self.threads < 1:
            raise ItfitsError(f"--threads must be at least 1, got {self.threads}")
        if not 0 < self.valid_pct < 1:
            raise ItfitsError(f"--valid-pct must be between 0 and 1, got {self.valid_pct}")
        if not 0 < self.keep <= 1:
            raise ItfitsError(f"--keep must be in (0, 1], got {self.keep}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ItfitsError(f"--lr must be a positive number, got {self.lr}")
        self.threshold = _threshold(self.threshold)
        if self.score is not None and self.score not in SCORES:
            raise ItfitsError(f"'{self.score}' is not an unknown score;{did_you_mean(self.score, SCORES)} choices: "
                              f"{', '.join(SCORES)}")
        if self.layers is not None and (not self.layers or min(self.layers) < 1):
            raise ItfitsError(f"--layers sizes must be at least 1, got {','.join(map(str, self.layers))!r}")
        if self.multi_label and self.target is not None:
            raise ItfitsError("--multi-label is for images (a path,label or path,labels table, or class folders); "
                              "a table with --target trains one class per row")
        if self.target is not None and self.balance not in ("auto", "none"):
            raise ItfitsError(f"--balance {self.balance} is for images and audio for now; a table trains unbalanced")
        if self.outlier_exposure and (self.unknown is None or self.target is not None):
            raise ItfitsError("--outlier-exposure trains on the --unknown examples of an image or audio fit: "
                              + ("give --unknown DIR" if self.target is None else "tables have no such training"))
        check_model(self.model)
        if self.target is None:
            if self.cat or self.cont or self.ignore or self.layers or self.model != AUTO:
                raise ItfitsError("--cat, --cont, --ignore, --layers and --model are for tables: add --target COLUMN")
            if self.unknown is not None:
                _check_unknown_folder(Path(self.data), Path(self.unknown))
        else:
            if self.unknown is not None and Path(self.unknown).suffix.lower() not in TABLE_EXTS:
                raise ItfitsError(f"with --target, --unknown takes a .csv/.parquet table of rows of none of the classes, "
                                  f"got {self.unknown}")
            _check_table_config(self)
            nn_only = [f"--{n.replace('_', '-')}" for n in ("epochs", "lr", "bs", "layers", "patience")
                       if getattr(self, n) is not None]
            if self.model == "gbdt" and nn_only:
                raise ItfitsError(f"{', '.join(nn_only)}: for the network (--model nn or auto); --model gbdt trains "
                                  "LightGBM's trees, which would ignore them")


IMAGE_ONLY = ("arch", "weights", "size", "freeze_epochs", "precision", "accum", "ema", "ema_decay", "compile", "mel")


def _check_table_config(config: FitConfig) -> None:
    """An ItfitsError naming the image/audio settings given for a table: fastai's tabular model has no backbone,
    image size, fine_tune phases or training controls, and ignoring them would leave run.json saying, e.g.,
    `ema: true` of a training without one."""
    defaults = config_defaults()
    given = [("--duration, --n-mels, ... (audio)" if n == "mel" else "--" + n.replace("_", "-"))
             for n in IMAGE_ONLY if getattr(config, n) != defaults[n]]
    if given:
        raise ItfitsError(f"{', '.join(given)}: for images and audio only; a table (--target {config.target}) "
                          "trains fastai's tabular model, which would ignore them. Leave them out")


def _threshold(value: str | float) -> str | float:
    """'auto', or the number a --threshold string or float gives."""
    if value == "auto":
        return value
    try:
        value = float(value)
    except ValueError:
        raise ItfitsError(f"--threshold takes auto or a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ItfitsError(f"--threshold must be auto or a finite number, got {value}")
    return value


def _check_unknown_folder(data: Path, unknown: Path) -> None:
    """--unknown of images or audio: a folder apart from DATA, holding files of some modality."""
    if not unknown.is_dir():
        raise ItfitsError(f"--unknown {unknown} is not a folder")
    known, other = data.resolve(), unknown.resolve()
    if known == other or other.is_relative_to(known) or known.is_relative_to(other):
        raise ItfitsError(f"--unknown {unknown} overlaps DATA {data}: it takes examples of none of the classes, so "
                          "that the unknown score is chosen on what the model never learnt; give a folder apart")
    if not has_files(unknown, file_exts()):
        kinds = " or ".join(m.what for m in modalities() if m.row_per_file)
        raise ItfitsError(f"--unknown {unknown} holds no {kinds} ({', '.join(sorted(file_exts()))})")


def config_defaults() -> dict:
    """FitConfig's defaults by field name (the report shows the settings that differ from them)."""
    return {f.name: f.default for f in fields(FitConfig) if f.default is not MISSING}


@dataclass(frozen=True)
class TrainedImages:
    """What `train_files` hands to `finish_files`: the trained Learner and what the run resolved."""
    learn: object  # fastai Learner, its model holding the final (EMA, where on) weights
    arch: str  # the backbone (what --arch auto chose)
    items: pl.DataFrame  # one row per input file (audio: per clip)
    classes: list[str]
    prep: object  # images.ImagePreprocessing
    history: pl.DataFrame
    resolved: dict  # lr, bs, precision, ... for run.json
    precision: object  # precision.Precision the training ran in
    started: float  # time.perf_counter() at the start
    options: object = None  # the modality's options resolved from the data (audio: the MelConfig)
    check: CheckResult | None = None  # the data check's duplicate pass (rank 0)
    multi_label: bool = False  # files of several classes, or none (multilabel.py finishes the run)


def write_run_config(config: FitConfig, run: Path) -> None:
    """RUN/checkpoints/config.json: the settings `--resume RUN` continues with, DATA and --unknown as absolute
    paths (a resume may start in another folder)."""
    absolute = {k: str(Path(v).resolve()) for k in ("data", "unknown") if (v := getattr(config, k))}
    write_json({**asdict(config), **absolute, "resume": False}, run / "checkpoints" / CONFIG)


def resume_config(run: Path | str) -> FitConfig:
    """The FitConfig of the run in folder `run`, set to resume it there (wherever the run was first written: a
    moved or copied run folder resumes where it is)."""
    stored = read_run_config(Path(run))
    known = {f.name for f in fields(FitConfig)}
    config = FitConfig(**{**{k: v for k, v in stored.items() if k in known}, "out": str(run), "resume": True})
    return config


def train_files(modality: Modality, config: FitConfig, *, log=print) -> TrainedImages:
    """`itfits fit` up to the trained Learner: data, a Learner with the training controls, lr_find, fine_tune with
    a checkpoint at each epoch end, or the rest of an interrupted run (config.resume). In data-parallel runs every
    process calls it (inside distributed.process_group()); rank 0 alone writes into the run folder."""
    t0 = time.perf_counter()
    run = Path(config.out)
    main = is_main()
    state = load_checkpoint(run) if config.resume else None
    # a resumed run's stored config has the epochs its start resolved
    # finished: every epoch, or fewer where --patience stopped it (run.json is written after the bundle)
    if state is not None and (run / "model").is_dir() and (
            state["epoch"] >= config.freeze_epochs + config.epochs or (run / "run.json").is_file()):
        raise ItfitsError(f"{run} is a finished run ({state['epoch']} of {config.freeze_epochs + config.epochs} "
                          f"epochs trained); nothing to resume. Its bundle is {run / 'model'}")
    if main:
        run.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)  # the DataLoaders draw their shuffling seed from python's random when they are made
    data = prepare_data(modality, config, run, log)
    epochs = data.epochs
    total = config.freeze_epochs + epochs
    # data-parallel: each process steps on its shard, about 1/world of the batches
    check_accumulation(accum=config.accum, batches=len(data.dls.train) // world_size(), bs=data.dls.train.bs,
                       phase_epochs=[config.freeze_epochs, epochs])
    if main and state is None:  # after the data checks: a run that failed on its data is no run to resume
        # a resumed run keeps the backbone and epochs auto chose
        write_run_config(replace(config, arch=data.arch, epochs=epochs), run)
    items, classes, prep, bs, dls = data.files, data.classes, data.prep, data.bs, data.dls
    n_skipped = items["error"].is_not_null().sum()
    world = world_size()
    log(f"{items.height - n_skipped} files in {len(classes)} classes "
        f"({len(dls.train_ds)} train, {len(dls.valid_ds)} valid{modality.train_unit}); {n_skipped} skipped"
        + (f", listed in {run / 'skipped.csv'}" if n_skipped else "")
        + f"; batch size {bs}{' (chosen from the data size)' if config.bs is None else ''}"
        + (f" x {config.accum} accumulated" if config.accum > 1 else "")
        + (f" x {world} processes" if world > 1 else "")
        + (f" = {effective_batch(bs, config.accum, world)} per step" if config.accum > 1 or world > 1 else "")
        + f", size {prep.size}")
    log(f"backbone {data.arch}" + (f" (--arch auto: {data.arch_why})" if data.arch_why else "")
        + f"; {epochs} epochs" + (f" (no --epochs: {data.epochs_why})" if data.epochs_why else ""))
    checked = check_at_fit(items, run, load=modality.load, log=log) if main else None
    # a resumed run keeps the precision it started with: the CPU probe could choose otherwise today
    precision = resolve_precision(state["precision"] if state else config.precision, arch=data.arch, size=prep.size)
    log(precision.line(timings=verbose()))
    set_seed(config.seed)
    log(data.balance.line())
    learn = image_learner(dls, data.arch, weights=config.weights, path=run, precision=precision, accum=config.accum,
                          ema=config.ema, ema_decay=config.ema_decay, compile=config.compile,
                          class_weights=data.balance.loss_weights(classes), multi_label=data.multi_label)
    if not main:  # one progress bar and log, from rank 0
        learn.remove_cb(ProgressCallback)
        learn.logger = lambda *a, **k: None
    # data-parallel runs shard the file DataLoaders: they compute the stem on the fly
    frozen = _cache_frozen(learn, modality, config, precision, data.arch, run) if world == 1 else None
    if frozen is not None:
        log(frozen.line())
    lr, suggestions = config.lr, None
    if state is not None:
        lr, suggestions = state["lr"], state.get("lr_suggestions")
        log(f"resuming {run}: {state['epoch']} of {total} epochs done" if state["epoch"] < total else
            f"{run} trained all {total} epochs but stopped before its bundle was written: finishing it")
    elif lr is None:
        # with --accum, lr_find's iterations are micro-batches: N x as many make its usual number of steps, so
        # the suggestion is an lr for the effective batch
        lr, suggestions = find_lr(learn, run if main else None, num_it=config.lr_find_iters * config.accum)
        lr, suggestions = broadcast_object((lr, suggestions))  # every process trains with rank 0's choice
        emit(log, "lr_find", lr_line(lr, suggestions, run), lr=lr, suggestions=suggestions)
    if world > 1:
        learn.add_cb(DataParallel())
    try:
        history = train(learn, epochs=epochs, lr=lr, freeze_epochs=config.freeze_epochs, patience=config.patience,
                        checkpoints=run / "checkpoints", resume=state,
                        checkpoint_meta={"lr": lr, "lr_suggestions": suggestions, "precision": precision.name})
    finally:
        if frozen is not None:  # the full network and the file DataLoaders: calibration and the bundle as ever
            frozen.restore(learn)
    if main:
        write_table(history, run / "history.csv")
    kept = best_epoch(history["valid_loss"].to_list())
    if kept != history.height - 1 or history.height < total:
        log(f"kept the weights of epoch {kept} (valid_loss {history['valid_loss'][kept]:.4f}, the lowest"
            + (f"; stopped after {history.height} of {total} epochs, --patience {config.patience})"
               if history.height < total else f"; {history['valid_loss'][-1]:.4f} after the last)"))
    ema, compiler = find_ema(learn), next((cb for cb in learn.cbs if type(cb).__name__ == "TorchCompile"), None)
    resolved = {"model": modality.describe(replace(config, arch=data.arch)), "arch": data.arch,
                "arch_why": data.arch_why, "epochs": epochs, "epochs_why": data.epochs_why, "lr": lr,
                "lr_suggestions": suggestions, "kept_epoch": kept, "kept_metric": MONITOR,
                "epochs_trained": history.height, "bs": bs, "accum": config.accum,
                "effective_bs": effective_batch(bs, config.accum, world), "size": prep.size, "classes": classes,
                "n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds), "n_skipped": int(n_skipped),
                "precision": precision.json(),
                "channels_last": any(type(cb).__name__ == "ChannelsLast" for cb in learn.cbs),
                "ema_decay": float(ema.final_decay) if ema is not None else None,
                "compiled": bool(compiler and not compiler.failed),
                "compile_error": compiler.failed if compiler else None,
                "num_workers": dls.train.fake_l.num_workers,  # fastai keeps the process count there
                "world_size": world, "resumed_after_epoch": state["epoch"] if state else None,
                "cpu": current_cpu_policy(),
                "n_outlier_exposure": data.n_outliers, "balance": data.balance.json()}
    return TrainedImages(learn=learn, arch=data.arch, items=items, classes=classes, prep=prep, history=history,
                         resolved=resolved, precision=precision, started=t0, options=data.options, check=checked,
                         multi_label=data.multi_label)


def finish_files(modality: Modality, trained: TrainedImages, config: FitConfig, *, log=print) -> dict:
    """Calibration, confusion matrix, the bundle and run.json of a trained run (rank 0's work). Returns run.json."""
    if trained.multi_label:
        return finish_multilabel(modality, trained, config, log=log, defaults=config_defaults())
    run, learn, classes, history = Path(config.out), trained.learn, trained.classes, trained.history
    # the pretrained body training started from, unchanged: the default unknown score works on its features
    reference = with_reference(learn.model, trained.arch, config.weights)
    calibration, calib_report, valid = calibrate_images(reference, trained.items, classes,
                                                        trained.prep, replace(config, arch=trained.arch),
                                                        modality=modality,
                                                        options=trained.options, precision=trained.precision)
    preds = valid["logits"].argmax(1)
    accuracy = float((preds == valid["targets"]).mean())
    recalls = {c: m["recall"] for c, m in per_class(valid["targets"], preds, classes).items()}
    emit(log, "calibration", calibration_line(calibration, calib_report), **calib_report)
    checked = trained.check and mislabelled_at_fit(trained.check, trained.items, valid, classes, run,
                                                   seed=config.seed, log=log)

    summary = {
        "config": asdict(config),
        "resolved": {**trained.resolved, **modality.resolved_json(trained.options, n_valid=len(valid["targets"]))},
        "results": {"valid_accuracy": accuracy, "valid_balanced_accuracy": balanced_accuracy(valid["targets"], preds),
                    "valid_recall": recalls, "valid_loss": float(history["valid_loss"][trained.resolved["kept_epoch"]]),
                    "seconds": round(time.perf_counter() - trained.started, 1)},
        "calibration": calib_report,
        **({"check": checked.json()} if checked else {}),
    }
    meta = modality.bundle_meta(trained.arch, classes, trained.prep, options=trained.options,
                                training={**summary["results"], "precision": trained.precision.name})
    save_bundle(learn.model, meta, calibration, run / "model", reference=reference)
    write_json(summary, run / "run.json")
    probs, scores, _ = calibration.apply(valid["logits"], valid["features"])
    images = modality.report_images(trained.items, valid["paths"])
    # the bundle and run.json are written: nothing after this may fail the run (reports.guarded)
    report = guarded([], "report.html", write_report, run, summary, history, Validation(
        logits=valid["logits"], targets=valid["targets"], names=valid["paths"], probs=probs, scores=scores,
        images=images), defaults=config_defaults())
    balanced = summary["results"]["valid_balanced_accuracy"]
    # audio: the epoch rows score windows, these figures whole clips (the mean of their windows' outputs)
    n = len(valid["targets"])
    per = f" of {n} {modality.what}, each the mean of its{modality.train_unit}" if modality.train_unit else ""
    emit(log, "done", f"valid accuracy {accuracy:.3f}, balanced accuracy {balanced:.3f}{per}; model bundle in "
         f"{run / 'model'}; report: {report or 'not written'}", valid_accuracy=accuracy,
         valid_balanced_accuracy=balanced, run=str(run))
    return summary


def fit(config: FitConfig, log=print) -> dict:
    """`itfits fit`: train on config.data and write the run folder, with the recipe of DATA's modality
    (`fit_files` for images and audio, `fit_table` for a table). Returns the run summary (run.json)."""
    return fit_run(config, log).summary


def fit_run(config: FitConfig, log=print) -> Fitted:
    """`fit`, returning the fastai Learner that trained the kept model beside the summary (`itfits.fit`'s Run)."""
    return modality_for(config.data, target=config.target).fit(config, log)


def fit_files(modality: Modality, config: FitConfig, log=print) -> Fitted:
    """The recipe of modalities of files: fine-tune a pretrained backbone. Under `accelerate launch` / `torchrun`,
    every process trains its shard; rank 0 returns the summary, the others an empty dict."""
    cpu = cpu_policy(threads=config.threads, workers=config.num_workers)
    with process_group(), cpu_threads(cpu):
        if is_main():
            emit(log, "cpu", cpu.line(), **cpu.json())
        trained = train_files(modality, config, log=log if is_main() else (lambda *a, **k: None))
        if not is_main():
            return Fitted({})
        return Fitted(finish_files(modality, trained, config, log=log), trained.learn)


def run_lr_find(config: FitConfig) -> tuple[float, dict[str, float]]:
    """`itfits lr-find`: lr_find.png / lr_find.csv in config.out, and the suggestions: those `fit` finds with the
    same settings (seeded in the same places, in the precision fit resolves)."""
    return modality_for(config.data, target=config.target).lr_find(config)


def lr_find_files(modality: Modality, config: FitConfig) -> tuple[float, dict[str, float]]:
    with cpu_threads(cpu_policy(threads=config.threads, workers=config.num_workers)):
        return _lr_find_files(modality, config)


def _lr_find_files(modality: Modality, config: FitConfig) -> tuple[float, dict[str, float]]:
    run = Path(config.out)
    set_seed(config.seed)  # as train_files: the DataLoaders draw their shuffling seed when they are made
    data = prepare_data(modality, config, run)
    precision = resolve_precision(config.precision, arch=data.arch, size=data.prep.size)
    set_seed(config.seed)
    learn = image_learner(data.dls, data.arch, weights=config.weights, path=run, precision=precision,
                          class_weights=data.balance.loss_weights(data.classes),  # the loss fit trains with
                          multi_label=data.multi_label)
    frozen = _cache_frozen(learn, modality, config, precision, data.arch, run)  # as fit: the same suggestions
    try:
        return find_lr(learn, run, num_it=config.lr_find_iters)
    finally:
        if frozen is not None:
            frozen.restore(learn)


def _cache_frozen(learn, modality: Modality, config: FitConfig, precision, arch: str, run: Path):
    """feature_cache.cache_frozen_features for a run's Learner: None where its backbone has no frozen stages."""
    from .backbones import get_spec
    return cache_frozen_features(learn, augment=modality.augment, freeze_epochs=config.freeze_epochs,
                                 precision=precision, channels_last=get_spec(arch).channels_last, folder=run)
