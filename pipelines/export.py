"""`itfits export`: a bundle's model as one ONNX or TorchScript file for deployment, and ONNX files back into
`itfits predict` through onnxruntime.

The file holds the network that prediction runs (the fine-tuned model beside its pretrained reference body, the
BatchNorms folded as predict.fast_path folds them): input `image`, a normalised (B, 3, size, size) float batch;
outputs `logits` (B, C) and `features` (B, F), the features every unknown score reads
(features.forward_features). Its metadata (ONNX metadata_props; TorchScript `_extra_files`) holds `itfits.json`
(the bundle's, with the classes, preprocessing constants and calibration: temperature, score, threshold), the
same three parts under their own keys for readers without itfits, and `itfits.unknown_stats`: the unknown
scores' statistics (Mahalanobis++ means and precision of the reference features, kNN banks, ...) as a base64
safetensors blob. Prediction from the file computes the scores with the same code as from the bundle
(unknown.Calibration), so they agree as closely as the two networks' outputs do. Nothing here unpickles.
"""
from __future__ import annotations

import base64
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .features import fold_batchnorm, forward_features
from .batches import file_outputs
from .bundle import Bundle, invalid_bundle, load_bundle, meta_problem
from .errors import ItfitsError
from .images import ImagePreprocessing
from .io import atomic_path
from .sources import expand_inputs
from .unknown import Calibration, UnknownStats

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT, OUTPUTS = "image", ("logits", "features")
META_KEY, STATS_KEY = "itfits.json", "itfits.unknown_stats"
OPSET = 17  # onnxruntime 1.16 and later run it
# what the exported network may differ from the bundle's by, relative to the largest output: fp32 rounding of
# folded BatchNorms and of the runtime's own fusions (measured: about 1e-6 on logits, 1e-5 on features)
TOLERANCE = 1e-4
# the bundle and its exported file on real files (compare_outputs, tests/test_export.py): folded BatchNorms, the
# channels-last layout of the torch path and the runtime's own fusions move logits by up to about 5e-4,
# calibrated probabilities by up to about 1.6e-4 and the pretrained_mahalanobis score (hundreds) by about 3e-6 of
# its size on data/fashion_test and data/fashion_unknown; labels and unknown flags agree there
CHECK_TOLERANCE = {"logits": 2e-3, "probabilities": 5e-4, "score_relative": 2e-5}
INSTALL_HINT = "pip install -e '.[export]'"


def _onnx_modules():
    """(onnx, onnxruntime), or the one-line way to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ItfitsError(f"ONNX export and prediction need onnx and onnxruntime ({e.name} is missing): "
                          f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


class GraphOutputs(nn.Module):
    """What the exported graph computes: (logits, features) of a bundle's scoring model (forward_features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return forward_features(self.model, x)


class ExportedModel(nn.Module):
    """An exported file's network as the batch engine (batches.py) runs it: its forward gives (logits, features)
    through `run` (an onnxruntime session's, or a loaded TorchScript module's), which features.forward_features
    passes on as they are."""
    returns_features = True

    def __init__(self, run, widths: tuple[int, int]):
        super().__init__()
        self.run, self.widths = run, widths
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # the engine asks a model for its device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(x):  # a group of audio clips without windows (batches._clip_outputs): the widths alone
            return torch.zeros(0, self.widths[0]), torch.zeros(0, self.widths[1])
        return self.run(x.detach().float().cpu().contiguous())


def _stats_blob(calibration: Calibration | None) -> str:
    """The unknown statistics as base64 safetensors (metadata values are text), '' when there are none."""
    from safetensors.torch import save
    if calibration is None or calibration.stats is None:
        return ""
    return base64.b64encode(save(calibration.stats.tensors())).decode("ascii")


def export_metadata(bundle: Bundle, fmt: str, widths: tuple[int, int]) -> dict[str, str]:
    """The file's metadata: every value text (ONNX metadata_props are strings)."""
    prep = bundle.meta["preprocessing"]
    multi = bundle.calibration is not None and bundle.calibration.multi_label
    probabilities = ("sigmoid(logits / calibration.temperature), a class present where its probability is at least "
                     "its calibration.thresholds entry (none: unknown)" if multi else
                     "softmax(logits / calibration.temperature)")
    meta = {**bundle.meta, "exported": {"format": fmt, "from": str(bundle.path), "input": INPUT,
                                        "outputs": list(OUTPUTS), "widths": list(widths)}}
    return {META_KEY: json.dumps(meta, default=str), STATS_KEY: _stats_blob(bundle.calibration),
            "classes": json.dumps(bundle.classes), "calibration": json.dumps(bundle.meta["calibration"]),
            "preprocessing": json.dumps(prep),
            "input": f"{INPUT}: float32 (batch, 3, {prep['size']}, {prep['size']}), RGB resized ({prep['resize']}) "
                     f"to {prep['size']} px, scaled to [0, 1], then (x - mean) / std per channel "
                     f"(preprocessing.mean, .std)" + (" ; audio: the mel-spectrogram window image "
                                                      "(preprocessing.mel)" if "mel" in prep else ""),
            "outputs": f"logits (batch, {widths[0]}): probabilities = {probabilities}; "
                       f"features (batch, {widths[1]}): what calibration.score reads (unknown when the score is "
                       f"below calibration.threshold), with the statistics in {STATS_KEY}"}


def _write_onnx(graph: nn.Module, example: torch.Tensor, metadata: dict[str, str], path: Path) -> None:
    onnx, _ = _onnx_modules()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated; the torch.export one cannot
        # follow the forward pre-hooks that features.forward_features reads the last stage's input with
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buf, input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={n: {0: "batch"} for n in (INPUT, *OUTPUTS)}, opset_version=OPSET,
                          dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


def _write_torchscript(graph: nn.Module, example: torch.Tensor, metadata: dict[str, str], path: Path) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated, yet it is what TorchScript is
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)  # checked below, after loading it back
        torch.jit.save(traced, str(path), _extra_files=metadata)


def _onnx_run(path: Path):
    """(run, metadata) of an ONNX file: run maps a float batch to (logits, features) on onnxruntime's CPU provider
    with as many threads as torch uses (OMP_NUM_THREADS and torch.set_num_threads apply to both alike)."""
    _, ort = _onnx_modules()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types: not an ONNX file, truncated, unknown operators
        raise ItfitsError(f"{path} cannot be loaded as an ONNX model ({' '.join(str(e).split())[:300]}); "
                          "pass a file written by itfits export --format onnx") from e

    def run(x: torch.Tensor):
        return tuple(torch.from_numpy(a) for a in session.run(list(OUTPUTS), {INPUT: x.numpy()}))
    return run, session.get_modelmeta().custom_metadata_map


def _torchscript_run(path: Path):
    metadata = {META_KEY: "", STATS_KEY: ""}
    with warnings.catch_warnings():  # torch.jit is deprecated, yet it is what TorchScript is
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=metadata)
    return (lambda x: module(x)), metadata


def load_exported(path: Path | str, *, fmt: str = "onnx") -> Bundle:
    """A Bundle whose model runs an exported file (ONNX through onnxruntime; TorchScript for export's own check):
    the metadata checked as a bundle's itfits.json is, the unknown statistics read from safetensors."""
    from safetensors.torch import load
    path = Path(path)
    if not path.is_file():
        raise ItfitsError(f"{path} is not a file; pass an .onnx file from itfits export, or a bundle folder")
    run, metadata = _onnx_run(path) if fmt == "onnx" else _torchscript_run(path)
    try:
        meta = json.loads(metadata.get(META_KEY) or "null")
        stats_blob = metadata.get(STATS_KEY) or ""
        stats = UnknownStats.from_tensors(load(base64.b64decode(stats_blob))) if stats_blob else None
    except Exception as e:  # JSON, base64 or safetensors that do not parse
        raise invalid_bundle(path, f"its {META_KEY} or {STATS_KEY} metadata cannot be read ({e})") from e
    problem = meta_problem(meta) or (None if isinstance(meta.get("exported"), dict) else
                                     "it was not written by itfits export (no 'exported' entry)")
    if problem:
        raise invalid_bundle(path, problem)
    widths = tuple(meta["exported"]["widths"])
    calibration = Calibration(**meta["calibration"], stats=stats)
    if calibration.score not in calibration.scores:
        raise invalid_bundle(path, f"its unknown score '{calibration.score}' needs statistics it lacks")
    if stats is not None and stats.n_features != widths[1]:
        raise invalid_bundle(path, f"its features have {widths[1]} columns; its statistics need {stats.n_features}")
    model = ExportedModel(run, widths).eval()
    return Bundle(path=path, meta=meta, model=model, calibration=calibration, scoring_model=model)


def load_model(path: Path | str) -> Bundle:
    """What `itfits predict` takes: a bundle folder (or run folder), or an .onnx file from itfits export."""
    path = Path(path)
    if path.suffix.lower() == ".onnx" and not path.is_dir():
        return load_exported(path)
    if path.is_file():
        raise ItfitsError(f"{path} is a file: predict takes a bundle folder (RUN/model) or an .onnx file from itfits "
                          "export (a TorchScript file is for torch.jit.load, outside itfits)")
    return load_bundle(path)


def compare_outputs(bundle: Bundle, exported: Bundle, files: list[str], *, batch_size: int = 64) -> dict:
    """The exported network against the bundle's on `files` (images, or audio clips through their mel windows):
    the largest differences of logits, features, calibrated probabilities and unknown scores, and in how many
    rows the label or the unknown flag differ."""
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    outs = [file_outputs(b.scoring_model, prep, files, modality=bundle.modality, options=bundle.options,
                         batch_size=batch_size, num_workers=0)
            for b in (bundle, exported)]
    good = np.array([not e for e in outs[0][2]], bool)
    if not good.any():
        raise ItfitsError(f"--check: none of the {len(files)} files could be read")
    (la, fa), (lb, fb) = [(o[0][good], o[1][good]) for o in outs]
    (pa, sa, ua), (pb, sb, ub) = [bundle.calibration.apply(lo, fe) for lo, fe in ((la, fa), (lb, fb))]
    out = {"files": int(good.sum()), "logits": float(np.abs(la - lb).max()), "features": float(np.abs(fa - fb).max()),
           "probabilities": float(np.abs(pa - pb).max()), "score": float(np.abs(sa - sb).max()),
           "score_scale": float(np.abs(sa).max()), "labels_differ": int((pa.argmax(1) != pb.argmax(1)).sum()),
           "unknown_differ": int((ua != ub).sum())}
    out["within_tolerance"] = (out["logits"] <= CHECK_TOLERANCE["logits"]
                               and out["probabilities"] <= CHECK_TOLERANCE["probabilities"]
                               and out["score"] <= CHECK_TOLERANCE["score_relative"] * max(1.0, out["score_scale"]))
    return out


def export_bundle(model: Path | str, out: Path | str, *, fmt: str, check: list[str] | None = None) -> dict:
    """Write `out` (fmt onnx or torchscript) atomically from the bundle at `model`, after checking that the written
    file's outputs match the bundle's network on an example batch; with `check` (files, folders, globs), compare
    them on those real files too (`compare_outputs`). Returns what was written and checked."""
    if fmt not in FORMATS:
        raise ItfitsError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.suffix.lower() != FORMATS[fmt]:
        raise ItfitsError(f"--out for --format {fmt} must end in {FORMATS[fmt]}, got {out.name}")
    if fmt == "onnx":
        _onnx_modules()  # before any work
    bundle = load_bundle(model)
    if not bundle.modality.row_per_file:
        raise ItfitsError(f"{model} is a {bundle.modality.name} model: itfits export takes models of files, images and "
                          "audio (a table's column encoding happens outside the network; a gbdt table model's trees "
                          "are its bundle's model.lgb.txt, LightGBM's own text format); predict rows with the "
                          "bundle folder instead")
    size = bundle.meta["preprocessing"]["size"]
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    graph = GraphOutputs(fold_batchnorm(bundle.scoring_model.eval(), example)).eval()
    with torch.no_grad():
        want = graph(example)
    widths = (want[0].shape[1], want[1].shape[1])
    write = _write_onnx if fmt == "onnx" else _write_torchscript
    with atomic_path(out) as tmp:
        with torch.no_grad():
            write(graph, example, export_metadata(bundle, fmt, widths), tmp)
        exported = load_exported(tmp, fmt=fmt)  # the file as written, read back as predict reads it
        with torch.inference_mode():
            got = exported.model(example)
        worst = max(float((w - g).abs().max() / w.abs().max().clamp(min=1)) for w, g in zip(want, got))
        if worst > TOLERANCE:
            raise ItfitsError(f"the exported model's outputs differ from the bundle's by {worst:.2g} of their size "
                              f"(tolerance {TOLERANCE:g}): an export bug, please report it with {model}'s itfits.json")
        compared = None
        if check:
            files = [p for p, err in expand_inputs(check, bundle.input_exts) if err is None]
            if not files:
                raise ItfitsError(f"--check {' '.join(check)}: no {bundle.modality.what} found")
            compared = compare_outputs(bundle, exported, files)
    return {"format": fmt, "out": str(out), "bytes": out.stat().st_size, "widths": widths, "example_diff": worst,
            "check": compared}

