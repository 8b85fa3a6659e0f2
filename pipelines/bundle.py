"""Model bundle: a folder with model.safetensors + itfits.json. Saving and loading never pickle anything."""
from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from .audio import MelConfig
from .backbones import MAX_SIZE, MIN_SIZE, WithReference, create_backbone, create_body, get_spec
from .errors import ItfitsError
from .io import atomic_dir
from .sources import AUDIO_EXTS, IMAGE_EXTS
from .tabular import TabularModelSpec, create_tabular_model
from .unknown import SCORES, Calibration, UnknownStats

FORMAT_VERSION = 1
WEIGHTS, META = "model.safetensors", "itfits.json"
REFERENCE = "reference"  # the pretrained body's key prefix in WEIGHTS, and its description's key in META


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("itfits", "torch", "torchvision", "fastai", "timm", "polars"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def image_bundle_meta(arch: str, classes: list[str], prep, *, training: dict, mel=None) -> dict:
    """itfits.json (less the calibration, added by save_bundle) for an image classifier, or a spectrogram
    classifier of audio when `mel` (the MelConfig it was trained with) is given."""
    return {
        "format_version": FORMAT_VERSION,
        "modality": "image" if mel is None else "audio",
        "backbone": arch,
        "classes": list(classes),
        "preprocessing": {**asdict(prep), **({} if mel is None else {"mel": mel.json()})},
        "training": training,
        "versions": library_versions(),
    }


def tabular_bundle_meta(prep, spec, *, training: dict) -> dict:
    """itfits.json for a tabular model: the column schema, vocabularies, fill values and normalisation
    (`TabularPreprocessing`) and what rebuilds fastai's TabularModel (`TabularModelSpec`)."""
    return {
        "format_version": FORMAT_VERSION,
        "modality": "tabular",
        "task": prep.task,
        "classes": list(prep.classes),
        "preprocessing": prep.json(),
        "model": spec.json(),
        "training": training,
        "versions": library_versions(),
    }


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: dict
    model: nn.Module  # in eval mode
    calibration: Calibration | None  # None for regression: no classes, no unknown flags
    # what prediction runs: `model`, or backbones.WithReference of it and the pretrained body it was fine-tuned
    # from (image and audio bundles since the pretrained_mahalanobis score)
    scoring_model: nn.Module | None = None

    def __post_init__(self):
        if self.scoring_model is None:
            object.__setattr__(self, "scoring_model", self.model)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def mel(self):
        """The MelConfig of an audio bundle; None for an image bundle."""
        if self.meta.get("modality") != "audio":
            return None
        return MelConfig.from_json(self.meta["preprocessing"]["mel"])

    @property
    def input_exts(self) -> set[str]:
        """File extensions prediction looks for in folders."""
        return AUDIO_EXTS if self.mel else IMAGE_EXTS


def save_bundle(model: nn.Module, meta: dict, calibration: Calibration | None, out_dir: Path, *,
                reference: nn.Module | None = None) -> None:
    """Write the bundle folder atomically: a crash leaves the previous bundle (or none), never half of one.
    The unknown scores' feature statistics go into the safetensors file beside the weights, and so does the
    `reference` body (the pretrained body of an image model, for the pretrained_mahalanobis score: `reference.*`)."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if reference is not None:
        state.update({f"{REFERENCE}.{k}": v.detach().cpu().contiguous() for k, v in reference.state_dict().items()})
        meta = {**meta, REFERENCE: {"body": meta["backbone"], "weights": "pretrained, not fine-tuned",
                                    "features": "input of the last stage, averaged over positions"}}
    if calibration is not None and calibration.stats is not None:
        state.update(calibration.stats.tensors())
    meta = {**meta, "calibration": calibration.json() if calibration is not None else None}
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def invalid_bundle(path: Path, reason: str) -> ItfitsError:
    return ItfitsError(f"{path} is not a valid itfits bundle: {reason}; pass RUN/model of a finished itfits fit")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def meta_problem(meta) -> str | None:
    """What makes a parsed itfits.json unusable (a missing key, a wrong type or value), or None. Checked once when
    the bundle is read, so the code that uses the bundle can trust it."""
    if not isinstance(meta, dict):
        return f"{META} holds a JSON {type(meta).__name__}, not an object"
    modality = meta.get("modality", "image")
    if modality not in ("image", "audio", "tabular"):
        return f"modality {modality!r} is not image, audio or tabular"
    own = ["model", "task"] if modality == "tabular" else ["backbone"]
    missing = [k for k in ["classes", "preprocessing", "calibration", *own] if k not in meta]
    if missing:
        return f"{META} has no {', '.join(missing)}"
    classes, prep, calib = meta["classes"], meta["preprocessing"], meta["calibration"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or (
            modality != "tabular" and len(classes) < 2):
        return "classes must be a list of 2 or more class names"
    if not isinstance(prep, dict) or not isinstance(meta.get("training", {}), dict):
        return "preprocessing and training must be JSON objects"
    if calib is None:
        if not (modality == "tabular" and meta["task"] == "regression"):
            return "calibration is missing (only a regression model has none)"
    elif not isinstance(calib, dict) or not {"temperature", "score", "threshold"} <= set(calib) <= {
            "temperature", "score", "threshold", "keep"}:
        return "calibration must hold temperature, score and threshold"
    elif calibration_problem(calib):
        return calibration_problem(calib)
    if modality == "tabular":
        if meta["task"] not in ("classification", "regression") or not isinstance(meta["model"], dict):
            return "task must be classification or regression, and model a JSON object"
        return None  # the tabular schema is checked as it is rebuilt (load_bundle)
    return image_problem(meta)


# ---- bounds of every number and enum of an image/audio bundle: a tampered itfits.json fails here, in one line
# naming the key and what it may hold, not later as a 240 GB allocation or a silent other behaviour

RESIZE_METHODS = ("squish", "crop", "pad")  # fastai's ResizeMethod
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_CLASSES = 100_000
MAX_TEMPERATURE = 1000.0


def _out_of_range(key: str, value, lo: float, hi: float, *, whole: bool = False) -> str | None:
    """Why `value` at `key` is not a number in [lo, hi] (a whole number when `whole`), or None."""
    ok = _number(value) and lo <= value <= hi and (not whole or isinstance(value, int))
    return None if ok else f"{key} must be a {'whole number' if whole else 'number'} in [{lo:g}, {hi:g}], got {value!r}"


def _one_of(key: str, value, choices) -> str | None:
    return None if value in choices else f"{key} must be one of {', '.join(choices)}, got {value!r}"


def calibration_problem(calib: dict) -> str | None:
    """What is wrong with a bundle's calibration object (temperature, score, threshold, keep), or None."""
    return (_out_of_range("calibration.temperature", calib["temperature"], 1e-6, MAX_TEMPERATURE)
            or (None if _number(calib["threshold"]) else f"calibration.threshold must be a number, got "
                                                            f"{calib['threshold']!r}")
            or _one_of("calibration.score", calib["score"], SCORES)
            or ("keep" in calib and _out_of_range("calibration.keep", calib["keep"], 1e-6, 1)) or None)


def image_problem(meta: dict) -> str | None:
    """What is wrong with an image or audio bundle's backbone, classes and preprocessing, or None."""
    prep, classes = meta["preprocessing"], meta["classes"]
    if len(classes) > MAX_CLASSES or len(set(classes)) != len(classes):
        return f"classes must be up to {MAX_CLASSES} different names, got {len(classes)} ({len(set(classes))} different)"
    if not isinstance(meta["backbone"], str):
        return f"backbone must be a backbone name, got {meta['backbone']!r}"
    try:  # a registered name, or a timm model name
        get_spec(meta["backbone"])
    except ItfitsError as e:
        return f"backbone: {e}"
    problem = (_out_of_range("preprocessing.size", prep.get("size"), MIN_SIZE, MAX_SIZE, whole=True)
               or _one_of("preprocessing.resize", prep.get("resize"), RESIZE_METHODS)
               or _one_of("training.precision", meta.get("training", {}).get("precision", "fp32"), PRECISIONS))
    if problem:
        return problem
    for key, lo in (("mean", 0.0), ("std", 1e-3)):
        values = prep.get(key)
        if not (isinstance(values, list) and len(values) == 3):
            return f"preprocessing.{key} must be 3 numbers, got {values!r}"
        problem = next(filter(None, (_out_of_range(f"preprocessing.{key}", v, lo, 1.0) for v in values)), None)
        if problem:
            return problem
    if meta.get("modality") == "audio":
        mel = prep.get("mel")
        if not isinstance(mel, dict):
            return f"preprocessing.mel must be a JSON object of mel parameters, got {mel!r}"
        try:
            MelConfig.from_json(mel)  # checks every parameter's range
        except (ItfitsError, TypeError, ValueError) as e:
            return f"preprocessing.mel is not a mel configuration ({e})"
    return None


def read_meta(path: Path) -> dict:
    """The checked itfits.json of the bundle at `path` (a bundle folder, or a run folder holding one)."""
    path = Path(path)
    if (path / "model").is_dir() and not (path / META).exists():  # a run folder: use its bundle
        path = path / "model"
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise ItfitsError(f"{path} is not a model bundle (needs {META} and {WEIGHTS}); pass RUN/model from itfits fit")
    try:
        meta = json.loads((path / META).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise invalid_bundle(path, f"{META} is not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise invalid_bundle(path, f"{META} is not valid JSON ({e})") from e
    if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
        raise ItfitsError(f"{path} has bundle format {meta.get('format_version')}; this itfits reads {FORMAT_VERSION}")
    problem = meta_problem(meta)
    if problem:
        raise invalid_bundle(path, problem)
    meta["_path"] = str(path)
    return meta


def _rebuild_model(meta: dict) -> nn.Module:
    """The untrained model itfits.json describes: fastai's TabularModel, or a backbone from the registry."""
    if meta.get("modality") == "tabular":
        return create_tabular_model(TabularModelSpec.from_json(meta["model"]))
    return create_backbone(meta["backbone"], num_classes=len(meta["classes"]), weights="none")


def load_bundle(path: Path | str) -> Bundle:
    """Rebuild the model from itfits.json (backbone registry or tabular spec) and load its safetensors weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta = read_meta(Path(path))
    path = Path(meta.pop("_path"))
    try:
        model = _rebuild_model(meta)
    except (KeyError, TypeError, ValueError) as e:  # a tabular model spec with keys missing or of the wrong type
        raise invalid_bundle(path, f"its model description in {META} is incomplete ({type(e).__name__}: {e})") from e
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:  # truncated, or not a safetensors file at all
        raise invalid_bundle(path, f"{WEIGHTS} cannot be read ({e})") from e
    own = {k: v for k, v in tensors.items() if not k.startswith(("unknown.", f"{REFERENCE}."))}
    ref = {k[len(REFERENCE) + 1:]: v for k, v in tensors.items() if k.startswith(f"{REFERENCE}.")}
    scoring = None
    try:
        stats = UnknownStats.from_tensors(tensors) if "unknown.bank" in tensors else None
        model.load_state_dict(own, strict=True)
        if ref:
            body = create_body(get_spec(meta["backbone"]), weights="none")[0]
            body.load_state_dict(ref, strict=True)
            scoring = WithReference(model, body).eval()
    except (RuntimeError, KeyError) as e:  # torch lists every mismatch on its own line: keep the first
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
        raise ItfitsError(f"the weights in {path / WEIGHTS} do not fit the model in {META}: {first}") from e
    if stats is not None and stats.ref_dim and scoring is None:
        raise invalid_bundle(path, f"it has statistics of a reference body but {WEIGHTS} holds no reference weights")
    calibration = Calibration(**meta["calibration"], stats=stats) if meta["calibration"] is not None else None
    if calibration is not None and calibration.score not in calibration.scores:
        raise invalid_bundle(path, f"its unknown score '{calibration.score}' needs statistics that {WEIGHTS} lacks")
    return Bundle(path=path, meta=meta, model=model.eval(), calibration=calibration, scoring_model=scoring)
