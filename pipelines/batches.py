"""The batch engine under prediction, calibration and evaluation: files -> (paths, logits, features, errors) per
batch, images decoded and normalised whole batches at a time, audio clips as the mean over their windows."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .audio import AudioError, MelConfig, render_windows, window_pil
from .features import forward_features
from .errors import ItfitsError
from .images import ImagePreprocessing, default_workers, load_image, loader_workers
from .logs import progress
from .modality import Modality, get_modality
from .precision import Precision
from .sources import expand_inputs, read_checked, text_path

TTA_IMAGES_ONLY = ("--tta is for image models: a spectrogram has a time direction, so it has no mirror image (audio "
                   "already averages a clip's windows), and a table row has no views; leave --tta out")


class ImageFiles(torch.utils.data.Dataset):
    """(path, error) pairs -> ((3, size, size) uint8 array, error); an unreadable file gives zeros and its error,
    never a crash. Batches become float and are normalised whole (`image_batches`), not image by image."""

    def __init__(self, items: list[tuple[str, str | None]], prep: ImagePreprocessing, load=load_image):
        self.items, self.prep, self.load = items, prep, load  # load(path, gray=...) -> PIL image (the modality's)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, error = self.items[i]
        if error is None:
            try:  # one decode, with check_image's checks (sources.read_checked)
                x, error = read_checked(path, self._array)
                if error is None:
                    return x, ""
            except Exception as e:  # a file that passed the checks but still fails: record, go on
                error = f"cannot decode: {e}"
        return np.zeros((3, self.prep.size, self.prep.size), np.uint8), error

    def _array(self, path) -> np.ndarray:
        return self.prep.array(self.load(path, gray=True))


def _stack(batch: list[tuple[np.ndarray, str]]) -> tuple[torch.Tensor, list[str]]:
    """DataLoader collate for ImageFiles: one uint8 tensor (B, 3, size, size), the errors as a list."""
    return torch.from_numpy(np.stack([x for x, _ in batch])), [e for _, e in batch]


def image_batches(model, prep: ImagePreprocessing, items: list[tuple[str, str | None]], *, batch_size: int = 64,
                  num_workers: int | None = None, precision: Precision | None = None, channels_last: bool = False,
                  tta: bool = False, load=load_image) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[str]]]:
    """(paths, logits, features, errors) per batch, files read with `load` (path, gray=...) -> PIL image, logits and features float32 whatever the `precision` (None:
    fp32); rows with an error have meaningless logits. `channels_last` for conv nets: faster on CPUs and GPUs.
    `tta` (fastai's test-time augmentation, with the one view that is no guess: the left-right flip that training's
    aug_transforms shows the model): logits and features are the means over the image and its mirror image, so the
    temperature, scores and threshold calibrated on single views apply as they are. It doubles the model's work.

    Without DataLoader workers (images.loader_workers: small CPU-only machines) files are decoded here: one after
    another while that costs little next to the model (small files: threads would only fight over the GIL and
    the model's cores, 14% fewer images/s at 64 px on 2 cores), in a pool of threads, one per core, from the
    first batch that took more than half as long to decode as the model took on it (large photos: PIL releases
    the GIL while it decodes, 1.9x on 2 cores)."""
    files = ImageFiles(items, prep, load)
    workers = min(loader_workers() if num_workers is None else num_workers, -(-len(items) // batch_size))
    loader = iter(torch.utils.data.DataLoader(files, batch_size=batch_size, collate_fn=_stack, num_workers=workers)
                  ) if workers else None
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=memory_format)
    device = next(model.parameters()).device
    pool = None
    try:
        with torch.inference_mode(), precision.autocast() if precision else nullcontext():
            for start in range(0, len(items), batch_size):
                began = time.perf_counter()
                if loader is None:
                    batch = range(start, min(start + batch_size, len(items)))
                    x, errors = _stack(list(pool.map(files.__getitem__, batch)) if pool else [files[i] for i in batch])
                else:
                    x, errors = next(loader)
                decoded = time.perf_counter()
                x = prep.normalize(x.to(device), memory_format)
                logits, features = forward_features(model, x)
                if tta:  # (B, 3, H, W): flip W
                    flipped = forward_features(model, x.flip(3))
                    logits, features = (logits + flipped[0]) / 2, (features + flipped[1]) / 2
                logits, features = logits.float().cpu().numpy(), features.float().cpu().numpy()
                if loader is None and pool is None and decoded - began > (time.perf_counter() - decoded) / 2:
                    pool = ThreadPoolExecutor(os.cpu_count() or 1)
                yield [p for p, _ in items[start:start + len(x)]], logits, features, errors
    finally:
        if pool is not None:
            pool.shutdown()


def file_batches(model, prep: ImagePreprocessing, items: list[tuple[str, str | None]], *,
                 modality: Modality | None = None, options=None, **kwargs):
    """The modality's batches (default: images), (paths, logits, features, errors) each: one row per input file.
    `options`: the modality's (audio: the MelConfig)."""
    return (modality or get_modality("image")).batches(model, prep, items, options=options, **kwargs)


def file_outputs(model, prep: ImagePreprocessing, paths: list[str], *, what: str = "model outputs",
                 **kwargs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(logits, features, errors) for a list of files (file_batches' keywords: the modality, its options, ...),
    all at once (validation, unknown examples); a long list reports its progress as `what` (logs.progress)."""
    batches = list(progress(file_batches(model, prep, [(p, None) for p in paths], **kwargs),
                            total=len(paths), what=what, count=lambda b: len(b[0])))
    if not batches:
        return np.zeros((0, 0)), np.zeros((0, 0)), []
    return (np.concatenate([b[1] for b in batches]), np.concatenate([b[2] for b in batches]),
            [e for b in batches for e in b[3]])


def unknown_outputs(model, prep: ImagePreprocessing, folder: str | Path, *, modality: Modality | None = None,
                    **kwargs) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(logits, features) of the readable files of the modality (default: images) under `folder` (examples of
    none of the classes, for fit and evaluate), and (path, error) of the unreadable ones. An ItfitsError when it
    holds no such file."""
    modality = modality or get_modality("image")
    paths = [p for p, err in expand_inputs([str(folder)], modality.exts) if err is None]
    if not paths:
        raise ItfitsError(f"--unknown {folder}: no {modality.what} found")
    logits, feats, errors = file_outputs(model, prep, paths, modality=modality, **kwargs)
    good = np.array([not e for e in errors])
    return logits[good], feats[good], [(text_path(p), e) for p, e in zip(paths, errors) if e]


# ---- audio: clips -> model outputs, windows averaged ---------------------------------------------------------

class AudioFiles:
    """Map-style dataset: (path, error) -> (window images (W, 3, size, size) uint8, error); an unreadable file
    gives no windows and its error, never a crash. All windows of a clip are used: as bytes, an hour of audio in
    5 s windows at 224 px holds about 110 MB (as float tensors it held 4x that)."""

    def __init__(self, items: list[tuple[str, str | None]], prep, cfg: MelConfig):
        self.items, self.prep, self.cfg = items, prep, cfg

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, error = self.items[i]
        if error is None:
            try:
                images = render_windows(path, self.cfg)
                return torch.from_numpy(np.stack([self.prep.array(window_pil(img)) for img in images])), ""
            except AudioError as e:
                error = str(e)
        return torch.zeros(0, 3, self.prep.size, self.prep.size, dtype=torch.uint8), error


def _clip_outputs(model, prep, clips: list, batch_size: int):
    """(logits, features) per clip of `clips` (each a (W, 3, size, size) uint8 tensor of its windows): the
    windows go through the model `batch_size` at a time; a clip's probabilities are the mean of its windows',
    returned as logits log(mean p), its features the mean of theirs. A clip without windows gets zeros."""
    device = next(model.parameters()).device
    counts = torch.tensor([len(c) for c in clips])
    x = torch.cat(clips)  # (windows of every clip, 3, size, size)
    outs = [forward_features(model, prep.normalize(x[i:i + batch_size].to(device)))  # an empty batch too:
            for i in range(0, max(1, len(x)), batch_size)]  # the outputs' widths
    logits = torch.cat([lo.float().cpu() for lo, _ in outs])
    feats = torch.cat([fe.float().cpu() for _, fe in outs])
    clip = torch.repeat_interleave(torch.arange(len(clips)), counts)  # window -> its clip
    div = counts.clamp(min=1).unsqueeze(1)
    probs = torch.softmax(logits, dim=1)
    c_probs = torch.zeros(len(clips), probs.shape[1]).index_add_(0, clip, probs) / div
    c_logits = torch.log(c_probs.clamp(min=1e-12))  # a clip without windows: equal (meaningless) logits
    c_feats = torch.zeros(len(clips), feats.shape[1]).index_add_(0, clip, feats) / div
    return c_logits.numpy(), c_feats.numpy()


def audio_batches(model, prep, cfg: MelConfig, items: list[tuple[str, str | None]], *, batch_size: int = 64,
                  num_workers: int | None = None) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[str]]]:
    """(paths, logits, features, errors) per group of clips, one row per clip, like predict.image_batches.

    The calibration (temperature, unknown score, threshold) is fitted on these same per-clip outputs at fit time
    (`_clip_outputs`), so the threshold keeps its meaning. Clips are rendered one per item in `num_workers`
    DataLoader processes and grouped until their windows fill a batch of `batch_size` (or `batch_size` clips):
    memory holds one group's windows, however long the clips. Rows with an error have meaningless outputs."""
    workers = default_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(AudioFiles(items, prep, cfg), batch_size=None,
                                         num_workers=min(workers, len(items)))
    model.eval()
    clips, errors, windows, start = [], [], 0, 0
    with torch.inference_mode():
        for i, (x, error) in enumerate(loader):
            clips.append(x)
            errors.append(error)
            windows += len(x)
            if windows >= batch_size or len(clips) >= batch_size or i == len(items) - 1:
                logits, feats = _clip_outputs(model, prep, clips, batch_size)
                yield [p for p, _ in items[start:start + len(clips)]], logits, feats, errors
                start += len(clips)
                clips, errors, windows = [], [], 0
