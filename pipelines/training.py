"""lr_find (plot + csv), training (fastai fine_tune) with a per-epoch history, and the whole `fit` of a run."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from fastai.callback.core import Callback
from fastai.learner import Recorder

from .audio import MelConfig
from .errors import ItfitsError
from .images import ImagePreprocessing
from .io import write_json, write_table

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
    lr: float | None = None  # None: run lr_find and use its valley suggestion
    bs: int | None = None  # None: chosen from the data size
    size: int | None = None  # None: the backbone's pretrained input size
    valid_pct: float = 0.2  # share of each class held out when the data has no split
    seed: int = 42
    threshold: str | float = "auto"  # auto: chosen on validation data to accept `keep` of correct items
    keep: float = 0.95  # share of correctly classified validation items the auto threshold accepts
    score: str | None = None  # unknown score; None: best on --unknown examples if given, else the default
    unknown: str | None = None  # folder of examples of none of the classes: for choosing score/threshold only
    num_workers: int | None = None  # None: up to 4, one per core (audio rendering: every core)
    lr_find_iters: int = 100
    mel: MelConfig | None = None  # audio DATA: how clips become spectrograms; None: MelConfig() defaults


class History(Callback):
    """One row per epoch over every fit of the Learner (fine_tune runs two: frozen, then unfrozen)."""
    order = Recorder.order + 1  # after Recorder has written this epoch's log

    def __init__(self):
        self.rows = []

    def before_epoch(self):
        self.start = time.perf_counter()

    def after_epoch(self):
        row = {n: v for n, v in zip(self.recorder.metric_names, self.recorder.log) if n not in ("epoch", "time")}
        phase = "frozen" if self.opt.frozen_idx else "unfrozen"
        self.rows.append({"epoch": len(self.rows), "phase": phase, **row,
                          "seconds": round(time.perf_counter() - self.start, 2)})


def find_lr(learn, out_dir: Path | None = None, *, num_it: int = 100) -> tuple[float, dict[str, float]]:
    """(chosen lr, all suggestions); writes lr_find.png and lr_find.csv into out_dir when given."""
    from fastai.callback.schedule import minimum, slide, steep, valley
    res = learn.lr_find(suggest_funcs=(minimum, steep, valley, slide), show_plot=False, num_it=num_it)
    suggestions = {name: float(v) for name, v in zip(LR_SUGGESTIONS, res)}
    rec = learn.recorder
    lrs, losses = np.asarray(rec.lrs, dtype=float), np.asarray([float(x) for x in rec.losses])
    if out_dir is not None:
        from .reports import plot_lr_find
        write_table(pl.DataFrame({"lr": lrs, "loss": losses}), Path(out_dir) / "lr_find.csv")
        plot_lr_find(lrs, losses, suggestions, CHOSEN_SUGGESTION, Path(out_dir) / "lr_find.png")
    return suggestions[CHOSEN_SUGGESTION], suggestions


def train(learn, *, epochs: int, lr: float, freeze_epochs: int = 1) -> pl.DataFrame:
    """fastai fine_tune: `freeze_epochs` on the head, then `epochs` unfrozen, one-cycle. Returns the history."""
    import fastai.callback.schedule  # noqa: F401  fastai @patches fine_tune/fit_one_cycle onto Learner here
    history = History()
    with learn.added_cbs(history):
        learn.fine_tune(epochs, base_lr=lr, freeze_epochs=freeze_epochs)
    return pl.DataFrame(history.rows)


@dataclass(frozen=True)
class Prepared:
    """The data of a run, ready for a Learner: images, or audio clips rendered to spectrogram images."""
    files: pl.DataFrame  # one row per input file: path, label, split, error (set for skipped files)
    classes: list[str]
    prep: ImagePreprocessing
    bs: int
    dls: object  # fastai DataLoaders over the images the Learner sees (audio: one per window of a clip)
    mel: MelConfig | None = None  # audio only: the rendering, stored in the bundle


def prepare_data(config: FitConfig, run: Path, log=print) -> Prepared:
    """Read, check (audio: render) and split config.data; skipped files listed in run/skipped.csv."""
    from .backbones import get_spec
    from .images import choose_batch_size, image_dataloaders
    from .sources import AUDIO_EXTS, check_files, detect_modality, read_source, require_classes

    spec = get_spec(config.arch)  # fail on a wrong name before reading any file
    mel = None
    if detect_modality(config.data) == "audio":  # clips -> window images, each window in its clip's split
        from .audio import render_folder, source_files
        mel = config.mel or MelConfig()
        files = read_source(config.data, exts=AUDIO_EXTS, valid_pct=config.valid_pct, seed=config.seed)
        items = render_folder(files, mel, workers=None if config.num_workers is None else max(1, config.num_workers))
        files = source_files(items)
        log(f"{files['error'].is_null().sum()} clips -> {items['error'].is_null().sum()} mel-spectrogram windows "
            f"({items['cached'].sum()} of them from the cache)")
    elif config.mel is not None:
        raise ItfitsError(f"mel options (--n-mels, --duration, ...) are for audio, and {config.data} holds images")
    else:
        files = items = check_files(read_source(config.data, valid_pct=config.valid_pct, seed=config.seed))
    write_table(files.filter(pl.col("error").is_not_null()).select("path", "label", "error"), run / "skipped.csv")
    classes = require_classes(files)
    prep = ImagePreprocessing(size=config.size or spec.input_size, mean=spec.mean, std=spec.std)
    n_train = items.filter(pl.col("error").is_null() & (pl.col("split") == "train")).height
    bs = config.bs or choose_batch_size(n_train)
    # no flips, rotations or warps on spectrograms: time runs one way and a frequency has one height
    dls = image_dataloaders(items, classes=classes, prep=prep, bs=bs, augment=mel is None, num_workers=config.num_workers)
    return Prepared(files=files, classes=classes, prep=prep, bs=bs, dls=dls, mel=mel)


def run_lr_find(config: FitConfig) -> tuple[float, dict[str, float]]:
    """`itfits lr-find`: lr_find.png / lr_find.csv in config.out, and the suggestions."""
    from fastai.torch_core import set_seed
    from .learners import image_learner
    run = Path(config.out)
    data = prepare_data(config, run)
    set_seed(config.seed)
    learn = image_learner(data.dls, config.arch, weights=config.weights, path=run)
    return find_lr(learn, run, num_it=config.lr_find_iters)


def calibrate_images(model, items: pl.DataFrame, classes: list[str], prep, config: FitConfig, *, mel: MelConfig | None = None,
                     max_train: int = 4096):
    """Temperature, unknown score and threshold from the validation set, feature statistics from (up to
    `max_train`) training items, score choice from config.unknown examples when given. With `mel`, items are
    audio clips and each clip's outputs are the mean over its windows, exactly as prediction computes them.
    Returns (Calibration, report, validation outputs {logits, features, targets, paths})."""
    from .predict import file_outputs
    from .sources import AUDIO_EXTS, IMAGE_EXTS, expand_inputs
    from .unknown import UnknownStats, calibrate

    def outputs(paths):
        return file_outputs(model, prep, paths, mel=mel, num_workers=config.num_workers)

    ok = items.filter(pl.col("error").is_null())
    index = {c: i for i, c in enumerate(classes)}
    valid = ok.filter(pl.col("split") == "valid")
    train = ok.filter(pl.col("split") == "train")
    train = train.sample(min(max_train, train.height), seed=config.seed) if train.height > max_train else train
    v_logits, v_feats, _ = outputs(valid["path"].to_list())
    _, t_feats, _ = outputs(train["path"].to_list())
    v_targets = np.array([index[c] for c in valid["label"]])
    stats = UnknownStats.fit(t_feats, np.array([index[c] for c in train["label"]]), len(classes), seed=config.seed)
    u_logits = u_feats = None
    if config.unknown:
        u_paths = [p for p, err in expand_inputs([config.unknown], AUDIO_EXTS if mel else IMAGE_EXTS) if err is None]
        if not u_paths:
            raise ItfitsError(f"--unknown {config.unknown}: no {'audio' if mel else 'image'} files found")
        u_logits, u_feats, u_errors = outputs(u_paths)
        good = np.array([not e for e in u_errors])
        u_logits, u_feats = u_logits[good], u_feats[good]
    threshold = None if config.threshold == "auto" else float(config.threshold)
    calibration, report = calibrate(v_logits, v_targets, v_feats, stats, keep=config.keep, score=config.score,
                                    threshold=threshold, unknown_logits=u_logits, unknown_features=u_feats)
    return calibration, report, {"logits": v_logits, "features": v_feats, "targets": v_targets,
                                 "paths": valid["path"].to_list()}


def fit(config: FitConfig, log=print) -> dict:
    """`itfits fit`: train on config.data and write the run folder. Returns the run summary (run.json)."""
    from fastai.torch_core import set_seed
    from .bundle import image_bundle_meta, save_bundle
    from .learners import image_learner
    from .reports import Validation, confusion_matrix, write_confusion_matrix, write_report

    t0 = time.perf_counter()
    run = Path(config.out)
    run.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, run, log)
    files, classes, prep, bs, dls = data.files, data.classes, data.prep, data.bs, data.dls
    n_skipped = files["error"].is_not_null().sum()
    log(f"{files.height - n_skipped} files in {len(classes)} classes "
        f"({len(dls.train_ds)} train, {len(dls.valid_ds)} valid{' windows' if data.mel else ''}); {n_skipped} skipped"
        + (f", listed in {run / 'skipped.csv'}" if n_skipped else "")
        + f"; batch size {bs}{' (chosen from the data size)' if config.bs is None else ''}, size {prep.size}")
    set_seed(config.seed)
    learn = image_learner(dls, config.arch, weights=config.weights, path=run)
    lr, suggestions = config.lr, None
    if lr is None:
        lr, suggestions = find_lr(learn, run, num_it=config.lr_find_iters)
        log("lr_find suggestions: " + ", ".join(f"{k} {v:.2e}" for k, v in suggestions.items())
            + f"; using {CHOSEN_SUGGESTION} {lr:.2e} (plot: {run / 'lr_find.png'})")
    history = train(learn, epochs=config.epochs, lr=lr, freeze_epochs=config.freeze_epochs)
    write_table(history, run / "history.csv")

    calibration, calib_report, valid = calibrate_images(learn.model, files, classes, prep, config, mel=data.mel)
    preds = valid["logits"].argmax(1)
    write_confusion_matrix(confusion_matrix(valid["targets"], preds, classes), classes, run)
    accuracy = float((preds == valid["targets"]).mean())
    log(f"temperature {calibration.temperature:.2f} (valid ECE {calib_report['valid_ece']['before']:.3f} -> "
        f"{calib_report['valid_ece']['after']:.3f}); unknown score {calibration.score}, threshold "
        f"{calibration.threshold:.4g} ({calib_report['score_chosen_by']})")

    summary = {
        "config": asdict(config),
        "resolved": {"lr": lr, "lr_suggestions": suggestions, "bs": bs, "size": prep.size, "classes": classes,
                     "n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds), "n_skipped": int(n_skipped),
                     **({"mel": data.mel.json(), "n_valid_clips": len(valid["targets"])} if data.mel else {})},
        "results": {"valid_accuracy": accuracy, "valid_loss": float(history["valid_loss"][-1]),
                    "seconds": round(time.perf_counter() - t0, 1)},
        "calibration": calib_report,
    }
    meta = image_bundle_meta(config.arch, classes, prep, training=summary["results"], mel=data.mel)
    save_bundle(learn.model, meta, calibration, run / "model")
    write_json(summary, run / "run.json")
    probs, scores, _ = calibration.apply(valid["logits"], valid["features"])
    report = write_report(run, summary, history, Validation(logits=valid["logits"], targets=valid["targets"],
                          names=valid["paths"], probs=probs, scores=scores, images=valid["paths"]))
    log(f"valid accuracy {accuracy:.3f}; model bundle in {run / 'model'}; report: {report}")
    return summary
