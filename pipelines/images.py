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

from .errors import ItfitsError
from .sources import decode_budget, open_image

BACKGROUND = (255, 255, 255)  # transparent pixels become white, not black (DESIGN: RGBA lesson)


def load_image(path: str, *, gray: bool = False) -> Image.Image:
    """An 8-bit RGB image: EXIF rotation applied, 16-bit scaled, palette and alpha composited on white.
    `gray`: a grayscale image stays one channel (mode L), for `ImagePreprocessing.array`, which resizes it before
    it repeats the channel: the same pixels as resizing its RGB copy, for a third of the work."""
    with open_image(path) as im, decode_budget(im.width * im.height):
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(im, dtype=np.float64)
            # 16-bit -> 8-bit by the file's depth, not its content: a dark 16-bit image stays dark. Mode I holds
            # 16-bit PGMs and 32-bit TIFFs alike: values past 65535 can only be 32-bit. Float images (mode F) hold
            # no depth: 0..255 as they are, larger ranges as 16-bit
            scale = 257.0 if im.mode != "F" or arr.max() > 255 else 1.0
            if im.mode == "I" and arr.max() > 65535:
                scale = (2 ** 31 - 1) / 255
            im = Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), "L")
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("L", "RGB") and "transparency" in im.info):
            rgba = im.convert("RGBA")
            out = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            out.alpha_composite(rgba)
            im = out
        return im if gray and im.mode == "L" else im.convert("RGB")


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

    def resized(self, img: Image.Image) -> Image.Image:
        """`img` resized exactly as fastai's validation pipeline does."""
        if self.resize == "squish":  # what fastai's Resize comes down to (whole-image crop_pad, then a bilinear
            # resize), without its transform dispatch: half of prediction's time per image at small sizes
            return img.resize((self.size, self.size), Image.BILINEAR)
        from fastai.vision.augment import Resize
        from fastai.vision.core import PILImage
        return Resize(self.size, method=self.resize)(PILImage(img), split_idx=1)

    def array(self, img: Image.Image) -> np.ndarray:
        """(3, size, size) uint8 (as torch lays images out), resized exactly as fastai's validation pipeline does.
        A grayscale image (load_image(gray=True)) is resized as one channel, then repeated."""
        a = np.asarray(self.resized(img))
        return np.repeat(a[None], 3, axis=0) if a.ndim == 2 else a.transpose(2, 0, 1)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """(3, size, size) float tensor in [0, 1], resized exactly as fastai's validation pipeline does."""
        return torch.from_numpy(np.ascontiguousarray(self.array(img))).float().div_(255)

    def normalize(self, batch: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
        """A batch in [0, 1] (float) or of bytes (uint8: divided by 255 first) normalised, in `memory_format`.
        Bytes become float once and the rest is in place, before the layout changes (per-channel operations are
        several times slower on channels-last tensors)."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        x = batch.float().div_(255) if batch.dtype == torch.uint8 else batch.clone()
        return x.sub_(mean).div_(std).contiguous(memory_format=memory_format)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def check_workers(workers: int | None) -> None:
    """--workers: None (chosen, see loader_workers) or a count of 0 (no worker processes) or more."""
    if workers is not None and workers < 0:
        raise ItfitsError(f"--workers must be 0 (no worker processes) or more, got {workers}")


def loader_workers(*, cached: bool = False) -> int:
    """DataLoader worker processes when the user sets none. With a GPU: up to 4, so decoding overlaps the GPU's
    work. Without one the model computes on the cores workers would take: none when the images come decoded
    from memory or the machine has 4 cores or fewer (measured on 2: workers cost more than they bring), else a
    quarter of the cores, up to 4."""
    cpus = os.cpu_count() or 1
    if torch.cuda.is_available():
        return default_workers()
    return 0 if cached or cpus <= 4 else min(4, cpus // 4)


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
    labels: tuple = ()  # multi-label: every class of the file


@dataclass(frozen=True)
class _PILItems:  # get_x of files decoded per epoch: a class, not a closure, so worker processes can take it
    load: object  # load(path, gray=...) -> PIL image

    def __call__(self, row: _Row):
        from fastai.vision.core import PILImage
        return PILImage(self.load(row.path))


CACHE_MAX_BYTES = 2 << 30  # decoded images kept in memory up to 2 GiB (10,000 at 224 px take 1.5 GiB)


class DecodedImages:
    """Every image decoded and resized once, at the start, kept as (3, size, size) uint8 arrays: epochs after the
    first pay for augmentation only, not for decoding files (a 12 MP JPEG takes ~50 ms, a training step on a
    CPU about as long). The resize is the deterministic one of validation (squish), so items are the same as
    decoding each time. Decoding runs in threads: PIL releases the GIL while it decodes."""

    def __init__(self, paths: list[str], prep: ImagePreprocessing, *, threads: int | None = None, load=load_image):
        from concurrent.futures import ThreadPoolExecutor
        self.prep, self.load = prep, load
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            self.arrays = dict(zip(paths, pool.map(self._decode, paths)))

    def _decode(self, path: str) -> np.ndarray:  # (3, size, size), as torch lays images out
        return np.ascontiguousarray(self.prep.array(self.load(path, gray=True)))

    def __call__(self, row: _Row):
        from fastai.torch_core import TensorImage
        return TensorImage(torch.from_numpy(self.arrays[row.path]))

    @staticmethod
    def fits(n: int, size: int) -> bool:
        return n * size * size * 3 <= CACHE_MAX_BYTES


def _label(row: _Row):
    return row.label


def _labels(row: _Row):
    return list(row.labels)


def _is_valid(row: _Row):
    return row.is_valid


OUTLIER = "\x00none of the classes"  # the label of --outlier-exposure examples: the vocabulary's last entry, no class


def image_dataloaders(items: pl.DataFrame, *, classes: list[str], prep: ImagePreprocessing, bs: int,
                      augment: bool = True, num_workers: int | None = None, cache: bool | None = None,
                      outliers: pl.DataFrame | None = None, load=load_image, weigh=None, multi_label: bool = False):
    """fastai DataLoaders over the usable rows of an items table (rows with an error are left out), files read
    with `load` (path, gray=...) -> PIL image (the modality's).
    cache: decode and resize every image once, up front (DecodedImages); None: when they fit in CACHE_MAX_BYTES.
    num_workers None: see loader_workers. outliers: training items of none of the classes (label OUTLIER), which
    become the vocabulary's last entry, after `classes`. weigh: the items' labels -> a sampling weight per item
    (balance.Balance.item_weights), or None: the training set is drawn by fastai's WeightedDL with them.
    multi_label: the targets are the items' `labels` (fastai's MultiCategoryBlock: one yes/no per class)."""
    if outliers is not None and outliers.height:
        items = pl.concat([items.select("path", "label", "split", "error"),
                           outliers.select("path", "label", "split", "error")])
        classes = [*classes, OUTLIER]
    from fastai.data.block import CategoryBlock, DataBlock, MultiCategoryBlock, TransformBlock
    from fastai.data.transforms import FuncSplitter, IntToFloatTensor, Normalize
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.vision.data import ImageBlock

    ok = items.filter(pl.col("error").is_null())
    labels = ok["labels"].to_list() if multi_label else [()] * ok.height
    rows = [_Row(*r, labels=tuple(names)) for r, names in
            zip(zip(ok["path"].to_list(), ok["label"].to_list(), (ok["split"] == "valid").to_list()), labels)]
    batch_tfms = (aug_transforms() if augment else []) + [Normalize.from_stats(prep.mean, prep.std)]
    if cache is None:
        cache = DecodedImages.fits(len(rows), prep.size)
    if cache:  # items are uint8 tensors already at size: no PIL, no item transforms, only batch ones
        x_block, item_tfms = TransformBlock(batch_tfms=IntToFloatTensor), []
        get_x = DecodedImages([r.path for r in rows], prep, load=load)
    else:
        x_block, get_x, item_tfms = ImageBlock, _PILItems(load), [Resize(prep.size, method=prep.resize)]
    y_block = MultiCategoryBlock(vocab=classes) if multi_label else CategoryBlock(vocab=classes, sort=False)
    block = DataBlock(blocks=(x_block, y_block), get_x=get_x, get_y=_labels if multi_label else _label,
                      splitter=FuncSplitter(_is_valid), item_tfms=item_tfms, batch_tfms=batch_tfms)
    n_train = sum(not r.is_valid for r in rows)
    workers = loader_workers(cached=cache) if num_workers is None else num_workers
    weights = weigh([r.label for r in rows]) if weigh else None
    if weights is not None:
        import fastai.callback.data  # noqa: F401  fastai @patches DataBlock.weighted_dataloaders there
        return block.weighted_dataloaders(rows, wgts=weights, bs=min(bs, n_train), num_workers=workers)
    return block.dataloaders(rows, bs=min(bs, n_train), num_workers=workers)
