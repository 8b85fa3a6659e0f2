"""The modality registry: one `Modality` per kind of input (images, audio clips, table rows), each in a module of
its own, and the only way the stages learn what a kind of input needs. The stages (sources, run, bundle, predict,
evaluate, reports, cli, web) ask a modality; none of them branches on its name.

Like fastai's TransformBlock (a unit per kind of data) and Hugging Face's Auto classes (one table from a type name
to its module, imported when first asked for): the built-in modalities register when first asked for, so
importing a stage loads no modality it does not use (predict of images never imports fastai's tabular code).
A new modality is one module: a `Modality` subclass and `register_modality(TheClass())`."""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import ItfitsError, ItfitsWarning, did_you_mean

if TYPE_CHECKING:
    import polars as pl
    from torch import nn

    from .bundle import Bundle
    from .predict import PredictConfig
    from .run import FitConfig

# name -> the module that registers it (imported on first use); its order is the order of detection
BUILTIN = {"image": ".image_modality", "audio": ".audio_modality", "tabular": ".table_modality"}
_REGISTRY: dict[str, "Modality"] = {}


@dataclass(frozen=True)
class Fitted:
    """What a modality's `fit` returns: run.json's content, and the fastai Learner that trained the kept model (None
    where none did: LightGBM's trees, or a data-parallel process other than rank 0, whose summary is empty)."""
    summary: dict
    learn: object = None


class Modality:
    """What one kind of input needs, from the files it claims to its bundle JSON. Subclasses set the class
    attributes and implement the methods; the base class says what each one is for."""
    name: str  # the bundle's meta["modality"]
    what: str  # the inputs, plural, for people ("images", "sound clips")
    counted: str = "files"  # what `predict` counts: one row per input file, or "rows" of tables
    exts: frozenset[str] = frozenset()  # file extensions it takes in folders (lower case, with the dot)
    options: type | None = None  # its options dataclass (checks itself in __post_init__), FitConfig's field of it
    row_per_file: bool = True  # predict yields one row per input file (False: rows of input tables)
    tta: bool = False  # test-time augmentation (--tta) has a view to average for its inputs
    multi_label: bool = False  # trains on files of several classes (a path,labels table; multilabel.py)

    # ---- which inputs it claims
    def claims(self, data: Path, target: str | None) -> bool:
        """Whether DATA (with `target`, the column --target names) holds this modality."""
        raise NotImplementedError

    def check_config(self, config: FitConfig) -> None:
        """An ItfitsError for options of other modalities, or that this one cannot use (FitConfig's own checks
        are done)."""

    # ---- training: items -> DataLoaders -> learner -> fit -> calibration -> bundle
    def fit(self, config: FitConfig, log) -> Fitted:
        """`itfits fit`: train on config.data, write the run folder; returns run.json's content and the Learner."""
        raise NotImplementedError

    def lr_find(self, config: FitConfig) -> tuple[float, dict[str, float]]:
        """`itfits lr-find`: the plot and table in config.out, and (chosen lr, suggestions)."""
        raise NotImplementedError

    # ---- the bundle: preprocessing to and from itfits.json
    def meta_problem(self, meta: dict) -> str | None:
        """What makes this modality's part of a parsed itfits.json unusable, or None."""
        raise NotImplementedError

    def rebuild(self, meta: dict) -> nn.Module:
        """The untrained model itfits.json describes (its weights are loaded after)."""
        raise NotImplementedError

    def preprocessing(self, meta: dict):
        """The bundle's preprocessing object (what turns an input into the model's), from itfits.json."""
        raise NotImplementedError

    def bundle_options(self, meta: dict):
        """The modality's options stored in a bundle (audio: its MelConfig), or None."""
        return None

    # ---- model outputs for prediction, calibration and evaluation
    def predict(self, bundle: Bundle, inputs: list[str], config: PredictConfig) -> Iterator[dict | pl.DataFrame]:
        """Rows of the predictions table: one dict per input file, or DataFrame chunks of input tables."""
        raise NotImplementedError

    def check_files(self, items: pl.DataFrame) -> pl.DataFrame:
        """The items table with `error` set for files that cannot be used, before any model runs."""
        return items

    # ---- how its items appear to people
    def describe(self, config: FitConfig) -> str:
        """The model a fit trains, in a few words (run.json's resolved.model, the report's first line)."""
        return config.arch

    def preview(self, path: Path) -> str | None:
        """A small picture of one input as a data URI (the web page's rows, the report), or None."""
        return None


def register_modality(modality: Modality) -> Modality:
    """Add `modality` to the registry under its name (a duplicate name replaces the entry, with a warning)."""
    if modality.name in _REGISTRY:
        warnings.warn(f"modality '{modality.name}' registered again; the new one replaces it", ItfitsWarning)
    _REGISTRY[modality.name] = modality
    return modality


def _load_builtins() -> None:
    for name, module in BUILTIN.items():
        if name not in _REGISTRY:
            importlib.import_module(module, __package__)


def modalities() -> list[Modality]:
    """Every registered modality, the built-in ones first, in the order of detection."""
    _load_builtins()
    return list(_REGISTRY.values())


def get_modality(name: str) -> Modality:
    """The registered modality called `name` (a bundle's meta["modality"])."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name], __package__)
    if name not in _REGISTRY:
        known = [m.name for m in modalities()]
        raise ItfitsError(f"'{name}' is not a modality;{did_you_mean(name, known)} choices: {', '.join(known)}")
    return _REGISTRY[name]


def modality_for(data: str | Path, *, target: str | None = None) -> Modality:
    """The modality of DATA (with --target's column, if given): the last registered that claims it (a modality
    added later may claim what a built-in one would), or images, whose reading then explains what is missing."""
    claimed = [m for m in modalities() if m.claims(Path(data), target)]
    return claimed[-1] if claimed else get_modality("image")


def file_exts() -> frozenset[str]:
    """Every extension of the modalities that take files (what --unknown DIR may hold)."""
    return frozenset().union(*(m.exts for m in modalities() if m.row_per_file))
