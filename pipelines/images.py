"""Image loading that survives real files, and the fastai DataLoaders built on it.

Training (fastai DataBlock) and prediction (`preprocess`) share `load_image` and the same resize, so a
bundle predicts exactly what the Learner saw at validation time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # transparent pixels become white, not black (DESIGN: RGBA lesson)


def load_image(path: str) -> Image.Image:
    """An 8-bit RGB image: EXIF rotation applied, 16-bit scaled, palette and alpha composited on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(im, dtype=np.float64)
            scale = 257.0 if arr.max() > 255 else 1.0  # 16-bit -> 8-bit
            im = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("L", "RGB") and "transparency" in im.info):
            rgba = im.convert("RGBA")
            out = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            out.alpha_composite(rgba)
            im = out
        return im.convert("RGB")


@dataclass(frozen=True)
class ImagePreprocessing:
    """What a bundle needs to turn a file into the model's input; stored in itfits.json."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squish"  # fastai ResizeMethod: whole image, aspect ratio not kept

    @classmethod
    def from_json(cls, d: dict) -> "ImagePreprocessing":
        return cls(size=d["size"], mean=tuple(d["mean"]), std=tuple(d["std"]), resize=d["resize"])

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """(3, size, size) float tensor in [0, 1], resized exactly as fastai's validation pipeline does."""
        from fastai.vision.augment import Resize
        from fastai.vision.core import PILImage, image2tensor
        img = Resize(self.size, method=self.resize)(PILImage(img), split_idx=1)
        return image2tensor(img).float().div_(255)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch - mean) / std


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def choose_batch_size(n_train: int, *, largest: int = 64) -> int:
    """Small data needs small batches (DESIGN lessons): about n/16, a power of two in [8, largest]."""
    bs = 8
    while bs * 2 <= min(largest, n_train / 16):
        bs *= 2
    return bs


@dataclass(frozen=True)
class _Row:  # not a tuple: fastai transforms map over tuples element by element
    path: str
    label: str
    is_valid: bool


def _pil_item(row: _Row):
    from fastai.vision.core import PILImage
    return PILImage(load_image(row.path))


def _label(row: _Row):
    return row.label


def _is_valid(row: _Row):
    return row.is_valid


def image_dataloaders(items: pl.DataFrame, *, classes: list[str], prep: ImagePreprocessing, bs: int,
                      augment: bool = True, num_workers: int | None = None):
    """fastai DataLoaders over the usable rows of an items table (rows with an error are left out)."""
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import FuncSplitter, Normalize
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.vision.data import ImageBlock

    ok = items.filter(pl.col("error").is_null())
    rows = [_Row(*r) for r in zip(ok["path"].to_list(), ok["label"].to_list(), (ok["split"] == "valid").to_list())]
    batch_tfms = (aug_transforms() if augment else []) + [Normalize.from_stats(prep.mean, prep.std)]
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=classes)), get_x=_pil_item, get_y=_label,
                      splitter=FuncSplitter(_is_valid), item_tfms=Resize(prep.size, method=prep.resize),
                      batch_tfms=batch_tfms)
    n_train = sum(not r.is_valid for r in rows)
    workers = default_workers() if num_workers is None else num_workers
    return block.dataloaders(rows, bs=min(bs, n_train), num_workers=workers)
