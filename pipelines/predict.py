"""Batch prediction: inputs -> rows of the predictions table (see DESIGN.md), streamed batch by batch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch

from .bundle import Bundle
from .images import ImagePreprocessing, default_workers, load_image
from .io import atomic_path
from .sources import check_image, expand_inputs


@dataclass
class PredictConfig:
    batch_size: int = 64
    num_workers: int | None = None  # None: up to 4, one per core
    topk: int = 3
    threshold: float | None = None  # None: the bundle's threshold


class ImageFiles(torch.utils.data.Dataset):
    """(path, error) pairs -> (input tensor, error); an unreadable file gives zeros and its error, never a crash."""

    def __init__(self, items: list[tuple[str, str | None]], prep: ImagePreprocessing):
        self.items, self.prep = items, prep

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, error = self.items[i]
        if error is None:
            error = check_image(path)
        if error is None:
            try:
                return self.prep.to_tensor(load_image(path)), ""
            except Exception as e:  # a file that passed the check but still fails: record, go on
                error = f"cannot decode: {e}"
        return torch.zeros(3, self.prep.size, self.prep.size), error


def _rows(paths, probs: np.ndarray, errors, classes, *, topk: int, threshold: float):
    k = min(topk, len(classes))
    order = np.argsort(-probs, axis=1)[:, :k]
    for path, p, top, error in zip(paths, probs, order, errors):
        if error:
            row = {"path": path, "label": None, "confidence": None, "unknown": None, "error": error, "score": None}
            row.update({f"top{j + 1}{s}": None for j in range(k) for s in ("", "_prob")})
        else:
            conf = float(p[top[0]])
            unknown = conf < threshold
            row = {"path": path, "label": "unknown" if unknown else classes[top[0]], "confidence": conf,
                   "unknown": unknown, "error": None, "score": conf}
            for j, c in enumerate(top):
                row[f"top{j + 1}"], row[f"top{j + 1}_prob"] = classes[c], float(p[c])
        yield row


def predict(bundle: Bundle, inputs: list[str], config: PredictConfig = PredictConfig()) -> Iterator[dict]:
    """One dict per input file (DESIGN.md predictions table), yielded as batches finish."""
    meta = bundle.meta
    prep = ImagePreprocessing(**{**meta["preprocessing"], "mean": tuple(meta["preprocessing"]["mean"]),
                                 "std": tuple(meta["preprocessing"]["std"])})
    threshold = meta["calibration"]["threshold"] if config.threshold is None else config.threshold
    temperature = meta["calibration"]["temperature"]
    items = expand_inputs(inputs)
    workers = default_workers() if config.num_workers is None else config.num_workers
    loader = torch.utils.data.DataLoader(ImageFiles(items, prep), batch_size=config.batch_size,
                                         num_workers=min(workers, max(1, len(items) // config.batch_size)))
    model = bundle.model
    start = 0
    with torch.inference_mode():
        for x, errors in loader:
            probs = torch.softmax(model(prep.normalize(x)).float() / temperature, dim=1).numpy()
            paths = [p for p, _ in items[start:start + len(x)]]
            start += len(x)
            yield from _rows(paths, probs, errors, bundle.classes, topk=config.topk, threshold=threshold)


def write_predictions(rows: Iterator[dict], out: Path, *, chunk: int = 1024) -> pl.DataFrame:
    """Write rows to CSV or Parquet (by extension) atomically, CSV in chunks as they come. Returns a summary."""
    out = Path(out)
    suffix = out.suffix.lower()
    counts = {"files": 0, "unknown": 0, "errors": 0}
    frames, buf, first = [], [], True
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        def flush():
            nonlocal first, buf
            if not buf:
                return
            df = pl.DataFrame(buf, infer_schema_length=None)
            counts["files"] += df.height
            counts["unknown"] += int(df["unknown"].fill_null(False).sum())
            counts["errors"] += int(df["error"].is_not_null().sum())
            if suffix == ".csv":
                df.write_csv(fh, include_header=first)
            else:
                frames.append(df)
            first, buf = False, []
        for row in rows:
            buf.append(row)
            if len(buf) >= chunk:
                flush()
        flush()
        if suffix == ".parquet":
            pl.concat(frames, how="diagonal_relaxed").write_parquet(fh) if frames else pl.DataFrame().write_parquet(fh)
    return counts
