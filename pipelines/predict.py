"""Batch prediction: inputs -> rows of the predictions table (see DESIGN.md), streamed batch by batch.
Image bundles yield one dict per file; tabular bundles yield DataFrame chunks (input columns, then predictions)."""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch

from .backbones import get_spec
from .features import fold_batchnorm
from .batches import TTA_IMAGES_ONLY
from .bundle import Bundle, load_bundle
from .errors import ItfitsError
from .images import ImagePreprocessing
from .io import atomic_path, csv_unwritable, write_csv
from .precision import prediction_precision, resolve_precision
from .sources import expand_inputs, text_path
from .table_learners import learner_of


@dataclass
class PredictConfig:
    batch_size: int = 64
    num_workers: int | None = None  # None: images.loader_workers (0 on small CPU-only machines, else up to 4)
    topk: int = 3
    threshold: float | None = None  # None: the bundle's threshold (chosen on validation data at fit time)
    precision: str = "auto"  # auto: the training's precision where the hardware has it, else fp32; fp32: exact outputs
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


def multilabel_frame(probs: np.ndarray, scores: np.ndarray, unknown: np.ndarray, errors, classes, *,
                     thresholds, topk: int) -> pl.DataFrame:
    """`prediction_frame` of a multi-label model (sigmoid probabilities): `labels` after `label` holds every class
    above its threshold, joined by ';' (empty: none); `label` is the same, or `unknown` where the row is flagged
    (no class above its threshold, or the unknown score below its threshold). top-k: the most probable classes."""
    frame = prediction_frame(probs, scores, unknown, errors, classes, topk=topk)
    above = np.asarray(probs) >= np.asarray(thresholds, dtype=np.float64)
    names = [";".join(c for c, on in zip(classes, row) if on) for row in above]
    ok, flagged = frame["error"].is_null().to_list(), np.asarray(unknown, bool).tolist()
    labels = pl.Series("labels", [n if good else None for n, good in zip(names, ok)], dtype=pl.String)
    label = pl.Series("label", [("unknown" if f else n) if good else None for n, f, good in zip(names, flagged, ok)],
                      dtype=pl.String)
    return frame.with_columns(label).insert_column(frame.columns.index("label") + 1, labels)


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


def table_predictions(bundle: Bundle, inputs: list[str], config: PredictConfig, *,
                      chunk: int = 65536) -> Iterator[pl.DataFrame]:
    """Prediction chunks for one CSV/Parquet table: every input column (typed as at training where it reads
    cleanly), then `prediction_frame` (classification) or `regression_frame` columns. Input columns named like an
    output column are kept with an `_input` suffix."""
    if len(inputs) != 1:
        raise ItfitsError(f"a tabular model predicts one table at a time, got {len(inputs)} inputs: "
                          "itfits predict MODEL rows.csv --out preds.parquet")
    predictor = Predictor(bundle, **asdict(config))
    table, parsed, errors = predictor.prep.read_rows(Path(inputs[0]))
    for start in range(0, max(table.height, 1), chunk):  # a table of no rows: the columns, with no rows
        yield predictor.table_frame(table.slice(start, chunk), parsed.slice(start, chunk), errors.slice(start, chunk))


def _rename_inputs(table: pl.DataFrame, classes: list[str]) -> pl.DataFrame:
    """Input columns named like an output column get an `_input` suffix (or _input2, ... where that is taken)."""
    outputs = {"label", "prediction", "confidence", "unknown", "error", "score"} | {
        f"top{j}{s}" for j in range(1, len(classes) + 1) for s in ("", "_prob")}
    taken, renamed = set(table.columns) | outputs, {}
    for c in [c for c in table.columns if c in outputs]:
        new, i = f"{c}_input", 2
        while new in taken:
            new, i = f"{c}_input{i}", i + 1
        renamed[c] = new
        taken.add(new)
    return table.rename(renamed)


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a bundle's model -> its folded copy


def fast_path(bundle: Bundle, prep: ImagePreprocessing, precision: str = "auto") -> dict:
    """image_batches' model, precision and memory format for a bundle. auto: the precision the model was trained (and
    calibrated) in, where this machine has it in hardware (precision.prediction_precision), else fp32; channels-last
    for conv nets. Why not bf16 for every model: BatchNorm subtracts running means from bf16 convolution outputs,
    and on low-contrast images that cancellation moved logits of an fp32-trained model by half their range.
    The bundle's model moves to the GPU where there is one; the model returned has its BatchNorms folded into its
    convolutions (features.fold_batchnorm: the same outputs, faster)."""
    arch, model = bundle.meta["backbone"], bundle.scoring_model
    if torch.cuda.is_available():
        model.cuda()
    device = next(model.parameters()).device
    if model not in _FOLDED:  # once per model: `itfits serve` predicts with the same bundle per request
        example = torch.randn(2, 3, prep.size, prep.size, generator=torch.Generator().manual_seed(0)).to(device)
        _FOLDED[model] = fold_batchnorm(model, example)
    trained = bundle.meta.get("training", {}).get("precision", "fp32")
    chosen = (prediction_precision(trained, arch=arch, size=prep.size, device=device) if precision == "auto" else
              resolve_precision(precision, arch=arch, size=prep.size, train=False, device=device))
    return {"model": _FOLDED[model], "precision": chosen,
            "channels_last": get_spec(arch).channels_last}


class Predictor:
    """The core of prediction: a bundle loaded once, then batches of inputs -> the predictions table's columns.

    `predict` (the local engine) streams every input through one Predictor; the Ray engine (ray_engine.py) hands
    the class to Ray Data's `map_batches`, which builds one per actor, so both engines give the same rows.
    `options` are PredictConfig's fields (batch_size, precision, threshold, topk, tta, num_workers)."""

    def __init__(self, bundle: Bundle | str | Path, **options):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.config = PredictConfig(**options)
        self.modality = self.bundle.modality
        if self.config.tta and not self.modality.tta:
            raise ItfitsError(TTA_IMAGES_ONLY)
        self.prep = self.modality.preprocessing(self.bundle.meta)
        calib = self.bundle.calibration
        # the predictions table's columns from (probabilities, scores, unknown flags, errors)
        self.frame = (partial(multilabel_frame, thresholds=calib.thresholds) if calib is not None and calib.multi_label
                      else prediction_frame)
        # files: the model, precision and memory format its batches run with (images: the folded fast path)
        self.fast = self.modality.scoring(self.bundle, self.prep, self.config.precision) if self.files else None

    @property
    def files(self) -> bool:
        """Whether the inputs are files, one row each (else rows of tables)."""
        return self.modality.row_per_file

    def frames(self, items: list[tuple[str, str | None]]) -> Iterator[pl.DataFrame]:
        """Image or audio files, (path, error) pairs as `expand_inputs` lists them -> one frame per batch of
        `config.batch_size`: path, then `prediction_frame`'s columns. A file with an error is not read."""
        c = self.config
        for paths, logits, features, errors in self.modality.batches(prep=self.prep, items=items,
                                                                     options=self.bundle.options,
                                                                     batch_size=c.batch_size,
                                                                     num_workers=c.num_workers, tta=c.tta, **self.fast):
            probs, scores, unknown = self.bundle.calibration.apply(logits, features, threshold=c.threshold)
            frame = self.frame(probs, scores, unknown, errors, self.bundle.classes, topk=c.topk)
            # file names that are not UTF-8 too
            yield frame.insert_column(0, pl.Series("path", [text_path(p) for p in paths], dtype=pl.String))

    def table_frame(self, table: pl.DataFrame, parsed: pl.DataFrame, errors: pl.Series) -> pl.DataFrame:
        """Rows of a table (as read, the model's columns parsed, per-row errors: TabularPreprocessing.read_rows)
        -> the table's columns, then `prediction_frame` (classification) or `regression_frame` columns."""
        prep, bundle = self.prep, self.bundle
        logits, feats = learner_of(bundle.meta["model"]).outputs(bundle.model, *prep.encode(parsed))
        if prep.task == "regression":
            values = prep.decode_target(logits[:, 0])
            finite = np.isfinite(values)
        else:
            probs, values, unknown = bundle.calibration.apply(logits, feats, threshold=self.config.threshold)
            finite = np.isfinite(probs).all(1) & np.isfinite(values)
        # values far beyond the training data's can overflow the model: an error, not a NaN or a confident label
        errs = [e or (None if ok else "the model's outputs are not finite numbers: values far outside the training "
                      "data's range") for e, ok in zip(errors.to_list(), finite)]
        out = (regression_frame(values, errs) if prep.task == "regression" else
               self.frame(probs, values, unknown, errs, bundle.classes, topk=self.config.topk))
        return _rename_inputs(table, prep.classes).hstack(out)

    def __call__(self, batch):
        """Ray Data's callable: a batch (a pyarrow Table, or a dict of columns) -> a pyarrow Table of the
        predictions table's columns. Files: columns `path` and optionally `error` (set where listing found the
        file unusable; such a file is not read). Tables: the rows of the table, as read (a CSV's columns as text)."""
        df = pl.from_arrow(batch) if not isinstance(batch, dict) else pl.DataFrame(batch)
        if not self.files:
            out = self.table_frame(df, *self.prep.parse_rows(df))
        else:
            errors = df["error"] if "error" in df.columns else pl.repeat(None, df.height, dtype=pl.String, eager=True)
            items = list(zip(df["path"].cast(pl.String).to_list(), errors.cast(pl.String).to_list()))
            out = pl.concat(list(self.frames(items)), how="vertical_relaxed") if items else self.frames_schema()
        # the oldest Arrow types (large_string, not string_view): what every Parquet reader takes
        return out.to_arrow(compat_level=pl.CompatLevel.oldest())

    def frames_schema(self) -> pl.DataFrame:
        """The columns `frames` yields, with no rows (an empty batch)."""
        k = min(self.config.topk, len(self.bundle.classes))
        frame = self.frame(np.zeros((0, len(self.bundle.classes))), np.zeros(0), np.zeros(0, bool), [],
                           self.bundle.classes, topk=k)
        return frame.insert_column(0, pl.Series("path", [], dtype=pl.String))


def predict(bundle: Bundle, inputs: list[str] | str | Path,
            config: PredictConfig = PredictConfig()) -> Iterator[dict | pl.DataFrame]:
    """The predictions table's rows (DESIGN.md), yielded as batches finish, by the bundle's modality: one dict per
    input file (an audio clip is rendered with the bundle's mel parameters and gets one row), or DataFrame chunks
    of an input table with its predictions (`table_predictions`). Runs `Predictor`, as the Ray engine does.
    A plain string (or Path) is one input, not a sequence of one-letter inputs."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    yield from bundle.modality.predict(bundle, [str(i) for i in inputs], config)


def predict_rows(bundle: Bundle, table: pl.DataFrame, config: PredictConfig = PredictConfig()) -> pl.DataFrame:
    """A tabular model's predictions of rows already in memory (a notebook's DataFrame, `itfits serve`'s JSON rows):
    the rows' columns, then the predictions' columns, as `table_predictions` gives them for a file. Text columns are
    parsed as a CSV's cells are (sources.NULL_VALUES are missing), with per-row errors."""
    if bundle.modality.row_per_file:
        raise ItfitsError(f"this model reads {bundle.modality.what}, not table rows: give it files")
    predictor = Predictor(bundle, **asdict(config))
    return predictor.table_frame(table, *predictor.prep.parse_rows(table, source="the table of rows"))


def predict_files(modality, bundle: Bundle, inputs: list[str], config: PredictConfig) -> Iterator[dict]:
    """`predict` for a modality of files (images, audio): inputs expanded to its files, one row each."""
    predictor = Predictor(bundle, **asdict(config))
    for frame in predictor.frames(expand_inputs(inputs, modality.exts)):
        yield from frame.iter_rows(named=True)


def flagged_line(counts: dict[str, int], *, counted: str = "files") -> str:
    """How many of the predicted rows (errors left out) were flagged unknown, as write_predictions counted them:
    'flagged 12 of 240 files unknown (5.0%)'."""
    done = counts["files"] - counts["errors"]
    return f"flagged {counts['unknown']} of {done} {counted} unknown" + (f" ({counts['unknown'] / done:.1%})" if done else "")


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
                write_csv(df, fh, include_header=not frames)
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
