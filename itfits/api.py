"""The Python API behind `import itfits`: `fit` a run, `load` a model, `Model.predict` any input of its kind.

Thin on purpose: `fit` is `itfits fit` (pipelines.run.fit_run on a FitConfig), and `Model.predict` /
`Model.predict_table` are `itfits predict` (pipelines.predict.predict on the same bundle), so the API and the CLI
give the same numbers. Images and arrays in memory are written as lossless PNG files to a temporary folder and
predicted as files: one path through the modality's reading and checks, whatever the input."""
from __future__ import annotations

import contextlib
import glob
import importlib
import tempfile
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
from PIL import Image

from pipelines.bundle import Bundle
from pipelines.errors import ItfitsError, did_you_mean
from pipelines.export import load_model
from pipelines.predict import PredictConfig, predict, predict_rows

__all__ = ["fit", "load", "Run", "Model", "Prediction", "FitConfig", "PredictConfig", "ItfitsError"]

# PIL modes a PNG file holds as they are; other modes (CMYK, YCbCr, ...) are converted to RGB first
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


@contextlib.contextmanager
def _quiet_fastai():
    """fastai's import scripts functions with `torch.jit.script`, which torch >= 2.10 answers with a FutureWarning at
    every `import fastai...`: nothing a user of itfits can act on (app/cli.py filters the same message)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        yield


def _training():
    """pipelines.run (fastai's training stages), imported when first needed: predicting never imports fastai."""
    with _quiet_fastai():
        return importlib.import_module("pipelines.run")


def __getattr__(name: str):
    if name == "FitConfig":  # lazily: it lives beside the training stages, which import fastai
        return _training().FitConfig
    raise AttributeError(f"module 'itfits.api' has no attribute {name!r}")


# ---- fit ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A finished `itfits.fit`: the run folder, its run.json and the fastai Learner that trained the kept model."""
    path: Path  # the run folder (FitConfig.out)
    summary: dict  # run.json: config, resolved, results, calibration
    learn: Any = None  # fastai's Learner (its model holds the bundle's weights); None for trees or the blend

    @property
    def bundle(self) -> Path:
        """The model bundle folder (RUN/model): what `itfits.load` and `itfits predict` take."""
        return self.path / "model"

    @property
    def report(self) -> Path | None:
        """RUN/report.html, or None where the report could not be written (the run itself is complete)."""
        path = self.path / "report.html"
        return path if path.is_file() else None

    @property
    def results(self) -> dict:
        """run.json's results: validation accuracy (or regression metrics), loss, seconds."""
        return self.summary.get("results", {})

    def load(self, **options) -> Model:
        """The run's model, ready to predict (`itfits.load(run.bundle, **options)`)."""
        return load(self.bundle, **options)


def _check_options(options: dict, names: set[str], what: str) -> None:
    for key in options:
        if key not in names:
            raise ItfitsError(f"'{key}' is not an option of {what};{did_you_mean(key, names)} the options are: "
                              f"{', '.join(sorted(names))}")


def fit(data: str | Path, *, log=print, **options) -> Run:
    """Train on DATA as `itfits fit DATA` does and write the run folder (`out=`, default FitConfig's).
    `options` are FitConfig's fields by name (epochs=3, size=64, lr=1e-3, target="species", ...); `log` gets each
    line `itfits fit` prints. Returns the Run: its folder, run.json, the fastai Learner, the bundle and report paths."""
    training = _training()
    _check_options(options, {f.name for f in fields(training.FitConfig)} - {"data"}, "itfits.fit")
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    config = training.FitConfig(data=str(data), **options)
    with _quiet_fastai():  # the message again where a fit imports more of fastai (timm, fastxtend) as it goes
        fitted = training.fit_run(config, log)
    return Run(path=Path(config.out), summary=fitted.summary, learn=fitted.learn)


# ---- predict -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """One input's prediction, the same record for every modality (a row of the predictions table, named)."""
    label: str | None  # the class, or "unknown" when flagged; None where the input could not be predicted
    confidence: float | None  # the calibrated probability of the most probable class
    unknown: bool | None  # flagged as none of the classes (its unknown_score is below the model's threshold)
    unknown_score: float | None  # the unknown score (the predictions table's `score`): higher is more like the classes
    probabilities: dict[str, float] = field(default_factory=dict)  # every class, most probable first (multi-label:
    # each class's own sigmoid)
    error: str | None = None  # why the input could not be predicted (an unreadable file, a bad table cell)
    source: str | None = None  # the file (or table file) it came from; None for an image, array or row in memory
    labels: list[str] | None = None  # multi-label models: every class above its threshold
    value: float | None = None  # regression models: the predicted number (label and confidence are None)


def _record(row: dict, source: str | None) -> Prediction:
    probs, j = {}, 1
    while f"top{j}" in row:
        if row[f"top{j}"] is not None:
            probs[row[f"top{j}"]] = row[f"top{j}_prob"]
        j += 1
    labels = row.get("labels")
    return Prediction(label=row.get("label"), confidence=row.get("confidence"), unknown=row.get("unknown"),
                      unknown_score=row.get("score"), probabilities=probs, error=row.get("error"), source=source,
                      labels=None if labels is None else [c for c in labels.split(";") if c],
                      value=row.get("prediction"))


def _as_image(x) -> Image.Image:
    """A PIL image or a numpy array (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; uint8, bool, or floats in
    [0, 1] -> a PIL image a PNG file holds."""
    if isinstance(x, np.ndarray):
        a = x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
            raise ItfitsError(f"an array of shape {x.shape} is not an image: give (height, width) gray or (height, "
                              "width, 3) RGB / 4 RGBA; a channels-first (3, H, W) array: np.moveaxis(a, 0, -1)")
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise ItfitsError("a float array is read as an image with values in [0, 1]; this one has values "
                                  "outside it (or NaN): scale it, or give uint8 values 0-255")
            a = np.round(a * 255).astype(np.uint8)
        elif a.dtype != np.uint8:
            raise ItfitsError(f"an array of {a.dtype} is not an image: give uint8 (0-255), bool, or floats in [0, 1]")
        return Image.fromarray(np.ascontiguousarray(a))
    if isinstance(x, Image.Image):
        if x.mode in PNG_MODES:
            return x
        try:
            return x.convert("RGB")
        except ValueError as e:
            raise ItfitsError(f"a PIL image in mode {x.mode} cannot be read as an image: convert it to RGB") from e
    raise ItfitsError(f"cannot predict a {type(x).__name__}: give a file path, a PIL image or a numpy array")


def _is_row(x) -> bool:
    return isinstance(x, dict) or type(x).__name__ == "Series" and type(x).__module__.startswith("pandas")


def _is_table(x) -> bool:
    return isinstance(x, pl.DataFrame) or type(x).__name__ == "DataFrame" and type(x).__module__.startswith("pandas")


def _rows_frame(rows: list) -> pl.DataFrame:
    """Rows in memory (dicts, pandas Series, polars or pandas DataFrames) -> one polars DataFrame."""
    frames = []
    for x in rows:
        if isinstance(x, pl.DataFrame):
            frames.append(x)
            continue
        # pandas: through Python values (pl.from_pandas would need pyarrow, which itfits does not install)
        records = x.to_dict("records") if _is_table(x) else [dict(x) if isinstance(x, dict) else x.to_dict()]
        frames.append(pl.DataFrame([{str(k): v for k, v in r.items()} for r in records], infer_schema_length=None))
    frame = pl.concat(frames, how="diagonal_relaxed")
    # a column with no value in any row has no type: read it as a CSV's empty cells are; pandas' NaN is missing
    return frame.with_columns([pl.col(c).cast(pl.String) for c, t in frame.schema.items() if t == pl.Null]
                              + [pl.col(c).fill_nan(None) for c, t in frame.schema.items() if t.is_float()])


class Model:
    """A loaded model bundle (or exported .onnx file) that predicts inputs of its kind: image or audio files, images
    and arrays in memory, table rows. Made by `itfits.load`."""

    def __init__(self, bundle: Bundle, config: PredictConfig):
        self.bundle, self.config = bundle, config

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.classes)

    def __repr__(self) -> str:
        return f"Model({str(self.bundle.path)!r}, {self.bundle.modality.name}, classes={self.classes})"

    def predict(self, x) -> Prediction | list[Prediction]:
        """One Prediction for one input: a file path (str or Path), a PIL image, a numpy array, a table row (a dict,
        `df.row(i, named=True)` of polars, or a pandas Series). A list of Predictions, in order, for a list of
        inputs, a folder or glob (its files), or a table (a CSV/Parquet path, a polars or pandas DataFrame: its
        rows)."""
        many = isinstance(x, (list, tuple)) or self._is_many(x)
        frame, sources = self._predict(x if isinstance(x, (list, tuple)) else [x],
                                       replace(self.config, topk=len(self.classes)))
        records = [_record(row, source) for row, source in zip(frame.drop("path", strict=False).iter_rows(named=True),
                                                                 sources)]
        return records if many else records[0]

    def predict_table(self, inputs) -> pl.DataFrame:
        """The predictions table `itfits predict` writes for the inputs (any `predict` takes, or a list of them):
        path (None for what was in memory) or a table's own columns, label, confidence, unknown, error, score,
        top-k."""
        return self._predict(inputs if isinstance(inputs, (list, tuple)) else [inputs], self.config)[0]

    def _is_many(self, x) -> bool:
        if _is_table(x):
            return True
        if isinstance(x, (str, Path)):
            return not self.bundle.modality.row_per_file or Path(x).is_dir() or glob.has_magic(str(x))
        return False

    def _predict(self, inputs: list, config: PredictConfig) -> tuple[pl.DataFrame, list[str | None]]:
        """(the predictions table of the inputs, in order; each row's source: its file's path or None)."""
        if not inputs:
            return pl.DataFrame(), []
        parts = list(self._files(inputs, config) if self.bundle.modality.row_per_file else self._tables(inputs, config))
        frame = pl.concat([p for p, _ in parts], how="diagonal_relaxed")
        return frame, [s for _, sources in parts for s in sources]

    def _files(self, inputs: list, config: PredictConfig) -> Iterator[tuple[pl.DataFrame, list]]:
        modality = self.bundle.modality
        with tempfile.TemporaryDirectory(prefix="itfits-api-") as folder:
            paths, in_memory = [], {}
            for i, x in enumerate(inputs):
                if isinstance(x, (str, Path)):
                    paths.append(str(x))
                    continue
                if ".png" not in modality.exts:
                    raise ItfitsError(f"this model reads {modality.what} ({', '.join(sorted(modality.exts))}): give "
                                      f"file paths, not a {type(x).__name__}")
                path = Path(folder) / f"{i:06d}.png"
                _as_image(x).save(path, compress_level=1)  # lossless: the pixels the model reads are the input's
                paths.append(str(path))
                in_memory[str(path)] = f"input {i}"
            rows = list(predict(self.bundle, paths, config))
        for row in rows:
            if row["path"] in in_memory:
                name = in_memory[row["path"]]
                row["error"] = row["error"] and row["error"].replace(row["path"], name)
                row["path"] = None
        yield pl.DataFrame(rows, infer_schema_length=None), [row["path"] for row in rows]

    def _tables(self, inputs: list, config: PredictConfig) -> Iterator[tuple[pl.DataFrame, list]]:
        rows: list = []  # consecutive rows in memory: predicted as one table
        for x in [*inputs, None]:
            if x is not None and (_is_row(x) or _is_table(x)):
                rows.append(x)
                continue
            if rows:
                frame = predict_rows(self.bundle, _rows_frame(rows), config)
                yield frame, [None] * frame.height
                rows = []
            if x is None:
                break
            if not isinstance(x, (str, Path)):
                raise ItfitsError(f"cannot predict a {type(x).__name__} with a table model: give a row (a dict, or a "
                                  "pandas Series), a DataFrame, or a CSV/Parquet path")
            frame = pl.concat(list(predict(self.bundle, [str(x)], config)), how="vertical_relaxed")
            yield frame, [str(x)] * frame.height


def load(model: str | Path, **options) -> Model:
    """The model in MODEL (a bundle folder RUN/model, a run folder, or an .onnx file from `itfits export`), loaded
    once, to predict with. `options` are PredictConfig's (threshold, topk, batch_size, precision, tta, num_workers)."""
    _check_options(options, {f.name for f in fields(PredictConfig)}, "itfits.load")
    return Model(load_model(model), PredictConfig(**options))
