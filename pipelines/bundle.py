"""Model bundle: a folder with model.safetensors + itfits.json. Saving and loading never pickle anything."""
from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from torch import nn

from .audio import MelConfig
from .backbones import create_body, get_spec
from .features import WithReference
from .errors import ItfitsError
from .io import atomic_dir
from .modality import Modality, get_modality, modalities
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


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: dict
    model: nn.Module  # in eval mode
    calibration: Calibration | None  # None for regression: no classes, no unknown flags
    # what prediction runs: `model`, or features.WithReference of it and the pretrained body it was fine-tuned
    # from (image and audio bundles since the pretrained_mahalanobis score)
    scoring_model: nn.Module | None = None

    def __post_init__(self):
        if self.scoring_model is None:
            object.__setattr__(self, "scoring_model", self.model)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def multi_label(self) -> bool:
        """Whether a file may have several classes, or none (sigmoids and per-class thresholds: multilabel.py)."""
        return bool(self.meta.get("multi_label", False))

    @property
    def modality(self) -> Modality:
        """The registered modality of meta["modality"] (checked when the bundle was read)."""
        return get_modality(self.meta.get("modality", "image"))

    @property
    def options(self):
        """The modality's options stored in the bundle (audio: its MelConfig), or None."""
        return self.modality.bundle_options(self.meta)

    @property
    def mel(self):
        """The MelConfig of an audio bundle (its options); None for other bundles."""
        options = self.options
        return options if isinstance(options, MelConfig) else None

    @property
    def input_exts(self) -> frozenset[str]:
        """File extensions prediction looks for in folders."""
        return self.modality.exts


def save_bundle(model: nn.Module, meta: dict, calibration: Calibration | None, out_dir: Path, *,
                reference: WithReference | None = None, files: dict[str, bytes] | None = None) -> None:
    """Write the bundle folder atomically: a crash leaves the previous bundle (or none), never half of one.
    The unknown scores' feature statistics go into the safetensors file beside the weights, and so does the
    pretrained body of `reference` (an image model's, for the pretrained_mahalanobis score: `reference.*`), less
    the stages it shares with `model`. `files`: more files of the model, in its library's own format (a LightGBM
    model's text), written beside them with their SHA-256 in itfits.json's `files` (checked when read)."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if reference is not None:
        state.update({f"{REFERENCE}.{k}": v.detach().cpu().contiguous()
                      for k, v in reference.reference.state_dict().items()})
        meta = {**meta, REFERENCE: {"body": meta["backbone"], "weights": "pretrained, not fine-tuned",
                                    "features": "input of the last stage, averaged over positions",
                                    "shared_stages": reference.shared_stages}}
    if calibration is not None and calibration.stats is not None:
        state.update(calibration.stats.tensors())
    meta = {**meta, "calibration": calibration.json() if calibration is not None else None}
    if files:
        meta["files"] = {name: sha256(data) for name, data in files.items()}
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def invalid_bundle(path: Path, reason: str) -> ItfitsError:
    return ItfitsError(f"{path} is not a valid itfits bundle: {reason}; pass RUN/model of a finished itfits fit")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def meta_problem(meta) -> str | None:
    """What makes a parsed itfits.json unusable (a missing key, a wrong type or value), or None. Checked once when
    the bundle is read, so the code that uses the bundle can trust it: the keys every bundle has here, the
    modality's own (its preprocessing, model description, bounds) by the registered modality."""
    if not isinstance(meta, dict):
        return f"{META} holds a JSON {type(meta).__name__}, not an object"
    name = meta.get("modality", "image")
    try:
        modality = get_modality(name) if isinstance(name, str) else None
    except ItfitsError:
        modality = None
    if modality is None:
        return f"modality {name!r} is not one of {', '.join(m.name for m in modalities())}"
    missing = [k for k in ["classes", "preprocessing", "calibration"] if k not in meta]
    if missing:
        return f"{META} has no {', '.join(missing)}"
    classes, prep, calib = meta["classes"], meta["preprocessing"], meta["calibration"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of class names"
    if not isinstance(prep, dict) or not isinstance(meta.get("training", {}), dict):
        return "preprocessing and training must be JSON objects"
    if calib is not None:
        if not isinstance(calib, dict) or not {"temperature", "score", "threshold"} <= set(calib) <= {
                "temperature", "score", "threshold", "keep", "thresholds"}:
            return "calibration must hold temperature, score and threshold"
        if calibration_problem(calib):
            return calibration_problem(calib)
    return (multi_label_problem(meta) or reference_problem(meta) or files_problem(meta)
            or modality.meta_problem(meta))


def files_problem(meta: dict) -> str | None:
    """What is wrong with a bundle's list of model files (name -> SHA-256; older bundles have none), or None."""
    files = meta.get("files", {})
    if not isinstance(files, dict):
        return f"files must be a JSON object of file name -> SHA-256, got {files!r}"[:300]
    for name, digest in files.items():
        if name in (WEIGHTS, META) or Path(name).name != name or name.startswith("."):
            return f"files names {name!r}, which is not a plain file name of its own"[:300]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            return f"files[{name!r}] must be a SHA-256 in hex, got {digest!r}"[:300]
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_files(path: Path, meta: dict) -> dict[str, bytes]:
    """The bundle's model files (itfits.json's `files`), each checked against its SHA-256."""
    out = {}
    for name, digest in meta.get("files", {}).items():
        try:
            data = (path / name).read_bytes()
        except OSError as e:
            raise invalid_bundle(path, f"{name} cannot be read ({e.strerror or e})") from e
        if sha256(data) != digest:
            raise invalid_bundle(path, f"{name} is not the file itfits wrote (its SHA-256 differs from the one in "
                                       f"{META}): it was changed or damaged after the fit")
        out[name] = data
    return out


def reference_problem(meta: dict) -> str | None:
    """What is wrong with the description of a bundle's reference body (older bundles have none), or None."""
    ref = meta.get(REFERENCE, {})
    if not isinstance(ref, dict):
        return f"{REFERENCE} must be a JSON object, got {ref!r}"[:300]
    return "shared_stages" in ref and out_of_range(f"{REFERENCE}.shared_stages", ref["shared_stages"], 0, 64,
                                                   whole=True) or None


def multi_label_problem(meta: dict) -> str | None:
    """What is wrong with a bundle's multi_label flag and per-class thresholds (older bundles have neither: a
    single-label model), or None."""
    multi, calib = meta.get("multi_label", False), meta["calibration"]
    if not isinstance(multi, bool):
        return f"multi_label must be true or false, got {multi!r}"
    thresholds = (calib or {}).get("thresholds")
    if not multi:
        return "calibration.thresholds belong to a multi-label model (multi_label: true)" if thresholds else None
    if not (isinstance(thresholds, list) and len(thresholds) == len(meta["classes"])):
        return (f"a multi-label model needs calibration.thresholds, one per class ({len(meta['classes'])}), got "
                f"{thresholds!r}"[:300])
    return next(filter(None, (out_of_range("calibration.thresholds", t, 0, 1) for t in thresholds)), None)


# ---- bounds of the numbers and enums of a bundle (the modalities check their own with these)

RESIZE_METHODS = ("squish", "crop", "pad")  # fastai's ResizeMethod
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_CLASSES = 100_000
MAX_TEMPERATURE = 1000.0


def out_of_range(key: str, value, lo: float, hi: float, *, whole: bool = False) -> str | None:
    """Why `value` at `key` is not a number in [lo, hi] (a whole number when `whole`), or None."""
    ok = _number(value) and lo <= value <= hi and (not whole or isinstance(value, int))
    return None if ok else f"{key} must be a {'whole number' if whole else 'number'} in [{lo:g}, {hi:g}], got {value!r}"


def one_of(key: str, value, choices) -> str | None:
    return None if value in choices else f"{key} must be one of {', '.join(choices)}, got {value!r}"


def calibration_problem(calib: dict) -> str | None:
    """What is wrong with a bundle's calibration object (temperature, score, threshold, keep), or None."""
    return (out_of_range("calibration.temperature", calib["temperature"], 1e-6, MAX_TEMPERATURE)
            or (None if _number(calib["threshold"]) else f"calibration.threshold must be a number, got "
                                                            f"{calib['threshold']!r}")
            or one_of("calibration.score", calib["score"], SCORES)
            or ("keep" in calib and out_of_range("calibration.keep", calib["keep"], 1e-6, 1)) or None)


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
    except RecursionError as e:  # arrays or objects nested thousands deep
        raise invalid_bundle(path, f"{META} nests its values too deep") from e
    if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
        raise ItfitsError(f"{path} has bundle format {meta.get('format_version')}; this itfits reads {FORMAT_VERSION}")
    problem = meta_problem(meta)
    if problem:
        raise invalid_bundle(path, problem)
    meta["_path"] = str(path)
    return meta


# the dtypes of the unknown scores' statistics (UnknownStats.tensors): the feature banks are kept in half precision
UNKNOWN_DTYPES = {"unknown.bank": ("float16", "float32"), "unknown.stage_bank": ("float16", "float32")}


def tensor_problem(tensors: dict, expected: dict, *, prefix: str = "") -> str | None:
    """Why the tensors of a safetensors file cannot be the weights of the model whose state dict is `expected`
    (a tensor of another dtype: the model would compute in the wrong one, or fail; NaN or infinite values: every
    output would be NaN), or None. `prefix`: the keys' prefix in the file (the reference body's)."""
    for key, t in tensors.items():
        want = expected.get(key)
        if key.startswith("unknown."):
            allowed = UNKNOWN_DTYPES.get(key, ("float32",))
        else:
            allowed = (str(want.dtype).removeprefix("torch."),) if want is not None else None
        if allowed is not None and str(t.dtype).removeprefix("torch.") not in allowed:
            return f"tensor {prefix}{key} is {str(t.dtype).removeprefix('torch.')}, where the model needs " \
                   f"{' or '.join(allowed)}"
        if t.is_floating_point() and not bool(t.isfinite().all()):
            return f"tensor {prefix}{key} holds NaN or infinite values"
    return None


def load_bundle(path: Path | str) -> Bundle:
    """Rebuild the model from itfits.json (backbone registry or tabular spec) and load its safetensors weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta = read_meta(Path(path))
    path = Path(meta.pop("_path"))
    files = read_files(path, meta)
    try:
        model = get_modality(meta.get("modality", "image")).rebuild(meta)
        if files:  # a model kept in its library's own format (gbdt.GBDTModel: LightGBM's text)
            model.load_files(files)
    except (KeyError, TypeError, ValueError) as e:  # a tabular model spec with keys missing or of the wrong type
        raise invalid_bundle(path, f"its model description in {META} is incomplete or does not fit its files "
                                   f"({type(e).__name__}: {e})") from e
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:  # truncated, or not a safetensors file at all
        raise invalid_bundle(path, f"{WEIGHTS} cannot be read ({e})") from e
    own = {k: v for k, v in tensors.items() if not k.startswith(("unknown.", f"{REFERENCE}."))}
    ref = {k[len(REFERENCE) + 1:]: v for k, v in tensors.items() if k.startswith(f"{REFERENCE}.")}
    scoring = None
    problem = tensor_problem({k: v for k, v in tensors.items() if not k.startswith(f"{REFERENCE}.")},
                             model.state_dict())
    if problem:
        raise invalid_bundle(path, f"{WEIGHTS}: {problem}")
    try:
        stats = UnknownStats.from_tensors(tensors) if "unknown.bank" in tensors else None
        model.load_state_dict(own, strict=True)
        if ref:  # bundles from before the shared stem have no shared_stages: the whole body
            shared = meta.get(REFERENCE, {}).get("shared_stages", 0)
            scoring = WithReference(model, create_body(get_spec(meta["backbone"]), weights="none")[0], shared).eval()
            problem = tensor_problem(ref, scoring.reference.state_dict(), prefix=f"{REFERENCE}.")
            if problem:
                raise invalid_bundle(path, f"{WEIGHTS}: {problem}")
            scoring.reference.load_state_dict(ref, strict=True)
    except (RuntimeError, KeyError) as e:  # torch lists every mismatch on its own line: keep the first
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
        raise ItfitsError(f"the weights in {path / WEIGHTS} do not fit the model in {META}: {first}") from e
    if stats is not None and stats.ref_dim and scoring is None:
        raise invalid_bundle(path, f"it has statistics of a reference body but {WEIGHTS} holds no reference weights")
    calibration = Calibration(**meta["calibration"], stats=stats) if meta["calibration"] is not None else None
    if calibration is not None and calibration.score not in calibration.scores:
        raise invalid_bundle(path, f"its unknown score '{calibration.score}' needs statistics that {WEIGHTS} lacks")
    return Bundle(path=path, meta=meta, model=model.eval(), calibration=calibration, scoring_model=scoring)
