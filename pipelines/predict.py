"""Batch prediction: inputs -> rows of the predictions table (see DESIGN.md), streamed batch by batch.
Image bundles yield one dict per file; tabular bundles yield DataFrame chunks (input columns, then predictions)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch

from .backbones import fold_batchnorm, get_spec
from .batches import TTA_IMAGES_ONLY, file_batches
from .bundle import Bundle
from .errors import ItfitsError
from .images import ImagePreprocessing
from .io import atomic_path, csv_unwritable, escape_formulas
from .precision import Precision, resolve_precision
from .sources import expand_inputs, text_path
from .tabular import TabularPreprocessing, tabular_outputs


@dataclass
class PredictConfig:
    batch_size: int = 64
    num_workers: int | None = None  # None: images.loader_workers (0 on small CPU-only machines, else up to 4)
    topk: int = 3
    threshold: float | None = None  # None: the bundle's threshold (chosen on validation data at fit time)
    precision: str = "auto"  # auto: the training's precision where faster, else fp32 (fast_path); fp32: exact outputs
    tta: bool = False  # images: average each image's outputs with its mirror image's (test-time augmentation)


def prediction_frame(probs: np.ndarray, scores: np.ndarray, unknown: np.ndarray, errors, classes, *,
                     topk: int) -> pl.DataFrame:
    """The predictions table's columns (DESIGN.md) after the inputs': label, calibrated confidence, unknown, error,
    score, top-k. Rows with an error (a non-empty string) have nulls in every other column."""
    k, n = min(topk, len(classes)), len(probs)
    order = np.argsort(-probs, axis=1)[:, :k]
    top_p = np.take_along_axis(probs, order, axis=1).astype(np.float64)
    names = np.asarray(classes, dtype=object)[order]
    errors = pl.Series("error", [text_path(e) if e else None for e in errors], dtype=pl.String)
    unknown = np.asarray(unknown, dtype=bool)
    cols = {"label": pl.Series(np.where(unknown, "unknown", names[:, 0]), dtype=pl.String), "confidence": top_p[:, 0],
            "unknown": unknown, "error": errors, "score": np.asarray(scores, dtype=np.float64)}
    for j in range(k):
        cols[f"top{j + 1}"] = pl.Series(names[:, j], dtype=pl.String)
        cols[f"top{j + 1}_prob"] = top_p[:, j]
    ok = errors.is_null()
    return pl.DataFrame(cols).with_columns(pl.when(ok).then(pl.col(c)).alias(c) for c in cols if c != "error")


def regression_frame(values: np.ndarray, errors) -> pl.DataFrame:
    """The predictions table's columns for a regression model: `prediction` in the target's units; confidence,
    unknown and score stay null (no calibrated unknown detection for regression)."""
    errors = pl.Series("error", [e or None for e in errors], dtype=pl.String)
    ok = errors.is_null()
    return pl.DataFrame({
        "prediction": pl.Series(np.asarray(values, dtype=np.float64)).zip_with(ok, pl.Series([None], dtype=pl.Float64)),
        "confidence": pl.repeat(None, len(ok), dtype=pl.Float64, eager=True),
        "unknown": pl.repeat(None, len(ok), dtype=pl.Boolean, eager=True),
        "error": errors,
        "score": pl.repeat(None, len(ok), dtype=pl.Float64, eager=True)})


def prediction_rows(paths, probs: np.ndarray, scores: np.ndarray, unknown: np.ndarray, errors, classes, *, topk: int):
    """Rows of the predictions table (DESIGN.md), one dict per file: path, then `prediction_frame`'s columns."""
    frame = prediction_frame(probs, scores, unknown, errors, classes, topk=topk)
    paths = pl.Series("path", [text_path(p) for p in paths], dtype=pl.String)  # file names that are not UTF-8 too
    yield from frame.insert_column(0, paths).iter_rows(named=True)


def table_predictions(bundle: Bundle, inputs: list[str], config: PredictConfig, *,
                      chunk: int = 65536) -> Iterator[pl.DataFrame]:
    """Prediction chunks for one CSV/Parquet table: every input column (typed as at training where it reads
    cleanly), then `prediction_frame` (classification) or `regression_frame` columns. Input columns named like an
    output column are kept with an `_input` suffix."""
    if len(inputs) != 1:
        raise ItfitsError(f"a tabular model predicts one table at a time, got {len(inputs)} inputs: "
                          "itfits predict MODEL rows.csv --out preds.parquet")
    prep = TabularPreprocessing.from_json(bundle.meta["preprocessing"])
    table, parsed, errors = prep.read_rows(Path(inputs[0]))
    outputs = {"label", "prediction", "confidence", "unknown", "error", "score"} | {
        f"top{j}{s}" for j in range(1, len(prep.classes) + 1) for s in ("", "_prob")}
    taken, renamed = set(table.columns) | outputs, {}
    for c in [c for c in table.columns if c in outputs]:  # <name>_input, or _input2, ... where that is taken
        new, i = f"{c}_input", 2
        while new in taken:
            new, i = f"{c}_input{i}", i + 1
        renamed[c] = new
        taken.add(new)
    table = table.rename(renamed)
    for start in range(0, max(table.height, 1), chunk):  # a table of no rows: the columns, with no rows
        logits, feats = tabular_outputs(bundle.model, *prep.encode(parsed.slice(start, chunk)))
        if prep.task == "regression":
            values = prep.decode_target(logits[:, 0])
            finite = np.isfinite(values)
        else:
            probs, values, unknown = bundle.calibration.apply(logits, feats, threshold=config.threshold)
            finite = np.isfinite(probs).all(1) & np.isfinite(values)
        # values far beyond the training data's can overflow the model: an error, not a NaN or a confident label
        errs = [e or (None if ok else "the model's outputs are not finite numbers: values far outside the training "
                      "data's range") for e, ok in zip(errors.slice(start, chunk).to_list(), finite)]
        out = (regression_frame(values, errs) if prep.task == "regression" else
               prediction_frame(probs, values, unknown, errs, bundle.classes, topk=config.topk))
        yield table.slice(start, chunk).hstack(out)


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a bundle's model -> its folded copy


def fast_path(bundle: Bundle, prep: ImagePreprocessing, precision: str = "auto") -> dict:
    """image_batches' model, precision and memory format for a bundle. auto: the precision the model was trained (and
    calibrated) in, where this machine runs it faster (on a CPU: the inference probe), else fp32; channels-last
    for conv nets. Why not bf16 for every model: BatchNorm subtracts running means from bf16 convolution outputs,
    and on low-contrast images that cancellation moved logits of an fp32-trained model by half their range.
    The bundle's model moves to the GPU where there is one; the model returned has its BatchNorms folded into its
    convolutions (backbones.fold_batchnorm: the same outputs, faster)."""
    arch, model = bundle.meta["backbone"], bundle.scoring_model
    if torch.cuda.is_available():
        model.cuda()
    device = next(model.parameters()).device
    if model not in _FOLDED:  # once per model: `itfits serve` predicts with the same bundle per request
        example = torch.randn(2, 3, prep.size, prep.size, generator=torch.Generator().manual_seed(0)).to(device)
        _FOLDED[model] = fold_batchnorm(model, example)
    trained = bundle.meta.get("training", {}).get("precision", "fp32")
    if precision == "auto" and trained == "fp32":
        chosen = Precision("fp32", "auto", device.type, "the model was trained and calibrated in fp32")
    else:
        chosen = resolve_precision(precision, arch=arch, size=prep.size, train=False, device=device)
    return {"model": _FOLDED[model], "precision": chosen,
            "channels_last": get_spec(arch).channels_last}


def predict(bundle: Bundle, inputs: list[str], config: PredictConfig = PredictConfig()) -> Iterator[dict | pl.DataFrame]:
    """One dict per input file (DESIGN.md predictions table), yielded as batches finish. An audio bundle renders
    each clip with its own mel parameters and reports one row per clip; a tabular bundle yields DataFrame chunks
    of the input table with its predictions (`table_predictions`)."""
    if bundle.meta.get("modality") == "tabular":
        if config.tta:
            raise ItfitsError(TTA_IMAGES_ONLY)
        yield from table_predictions(bundle, inputs, config)
        return
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    items = expand_inputs(inputs, bundle.input_exts)
    if "exported" in bundle.meta and config.precision not in ("auto", "fp32"):
        raise ItfitsError(f"--precision {config.precision}: an exported model runs as it was exported (fp32); "
                          "leave --precision out, or predict with the bundle folder")
    # audio: the model as calibrated, fp32; an exported file (export.load_exported): folded and fp32 already
    fast = (fast_path(bundle, prep, config.precision) if bundle.mel is None and "exported" not in bundle.meta
            else {"model": bundle.scoring_model})
    for paths, logits, features, errors in file_batches(prep=prep, items=items, mel=bundle.mel,
                                                        batch_size=config.batch_size, num_workers=config.num_workers,
                                                        tta=config.tta, **fast):
        probs, scores, unknown = bundle.calibration.apply(logits, features, threshold=config.threshold)
        yield from prediction_rows(paths, probs, scores, unknown, errors, bundle.classes, topk=config.topk)


def write_predictions(rows: Iterator[dict | pl.DataFrame], out: Path, *, chunk: int = 1024) -> dict[str, int]:
    """Write rows (dicts, or DataFrame chunks) to CSV or Parquet (by extension) atomically, CSV in chunks as they
    come. Returns counts."""
    out = Path(out)
    counts = {"files": 0, "unknown": 0, "errors": 0}
    frames, buf = [], []
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        def flush(df: pl.DataFrame | None = None):
            if df is None and not buf:
                return
            df = pl.DataFrame(buf, infer_schema_length=None) if df is None else df
            counts["files"] += df.height
            counts["unknown"] += int(df["unknown"].fill_null(False).sum())
            counts["errors"] += int(df["error"].is_not_null().sum())
            if out.suffix.lower() == ".csv":
                nested = csv_unwritable(df)
                if nested:
                    raise ItfitsError(f"the input has columns a CSV cannot hold: {', '.join(nested)}; write "
                                      f"--out {out.with_suffix('.parquet').name}, or drop them from the input")
                escape_formulas(df).write_csv(fh, include_header=not frames)
            frames.append(df if out.suffix.lower() == ".parquet" else df.clear())
            buf.clear()
        for row in rows:
            if isinstance(row, pl.DataFrame):
                flush()
                flush(row)
                continue
            buf.append(row)
            if len(buf) >= chunk:
                flush()
        flush()
        if out.suffix.lower() == ".parquet":
            (pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()).write_parquet(fh)
    return counts
