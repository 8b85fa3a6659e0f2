"""The image modality: folders (or path,label tables) of image files, fine-tuned as a pretrained backbone from the
registry, predicted in batches of decoded files. Audio (audio_modality) is this modality with clips rendered to
spectrogram images first; a new kind of picture-like file (a toy in the tests: .npy arrays) is a subclass that
says which files it claims and how one becomes a PIL image (`load`, `check_file`)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import polars as pl
from PIL import Image

from .backbones import MAX_SIZE, MIN_SIZE, create_backbone, get_spec
from .batches import image_batches
from .bundle import PRECISIONS, RESIZE_METHODS, MAX_CLASSES, out_of_range, one_of
from .errors import ItfitsError
from .images import ImagePreprocessing, load_image
from .modality import Modality, register_modality
from .predict import fast_path, predict_files
from .sources import IMAGE_EXTS, check_files, check_image, read_source


class ImageModality(Modality):
    name = "image"
    what = "images"
    exts = frozenset(IMAGE_EXTS)
    augment = True  # flips, rotations, warps and lighting in training (fastai's aug_transforms)
    train_unit = ""  # what the training items are called in the run's log, when they are not the files
    tta = True  # the left-right mirror image, which training's augmentation shows the model
    multi_label = True

    def claims(self, data: Path, target: str | None) -> bool:
        return target is None  # files of any kind: read_source then says what is missing

    def check_config(self, config) -> None:
        if config.mel is not None:
            raise ItfitsError(f"mel options (--n-mels, --duration, ...) are for audio, and {config.data} holds "
                              f"{self.what}")

    # ---- files: reading, checking, the model's outputs
    def load(self, path: str, *, gray: bool = False) -> Image.Image:
        """One file as the 8-bit picture the model sees (`gray`: a grayscale one may stay one channel)."""
        return load_image(path, gray=gray)

    def check_file(self, path: str) -> str | None:
        """None when the file can be used, else the reason it cannot."""
        return check_image(path)

    def check_files(self, items: pl.DataFrame) -> pl.DataFrame:
        return check_files(items, self.check_file)

    def read_items(self, config, log):
        """(files, training items, resolved options) of config.data: one row per file, checked and split."""
        files = read_source(config.data, exts=self.exts, valid_pct=config.valid_pct, seed=config.seed,
                            check=self.check_file, multi_label=config.multi_label)
        return files, files, None

    def usable(self, items: pl.DataFrame, options, config) -> pl.DataFrame:
        """Training items of extra files (--outlier-exposure's examples), with `error` set where unusable."""
        return self.check_files(items)

    def batches(self, model, prep, items, *, options=None, **kwargs):
        """batches.image_batches, reading files with `load`."""
        return image_batches(model, prep, items, load=self.load, **kwargs)

    def scoring(self, bundle, prep, precision: str) -> dict:
        """The model, precision and memory format `batches` runs a bundle with at prediction."""
        if "exported" in bundle.meta:  # export.load_exported: folded and fp32 already, run by onnxruntime
            if precision not in ("auto", "fp32"):
                raise ItfitsError(f"--precision {precision}: an exported model runs as it was exported (fp32); "
                                  "leave --precision out, or predict with the bundle folder")
            return {"model": bundle.scoring_model}
        return fast_path(bundle, prep, precision)

    def predict(self, bundle, inputs, config):
        return predict_files(self, bundle, inputs, config)

    # ---- runs
    def fit(self, config, log):
        from .run import fit_files  # the training stages import fastai: prediction must not pay for it at start-up
        return fit_files(self, config, log)

    def lr_find(self, config):
        from .run import lr_find_files
        return lr_find_files(self, config)

    def resolved_json(self, options, *, n_valid: int) -> dict:
        """What run.json's `resolved` records of the options chosen from the data, and of the `n_valid` validation
        files (when they are not the training items)."""
        return {}

    def options_json(self, options) -> dict:
        """The options' part of the bundle's preprocessing object."""
        return {}

    def report_images(self, items: pl.DataFrame, paths: list[str]) -> list[str]:
        """The image files that show `paths` in the report."""
        return paths

    def preview(self, path: Path) -> str | None:
        from .reports import thumbnail_uri
        return thumbnail_uri(path, size=64)

    # ---- the bundle
    def bundle_meta(self, arch: str, classes: list[str], prep, *, training: dict, options=None) -> dict:
        from .bundle import FORMAT_VERSION, library_versions
        return {"format_version": FORMAT_VERSION, "modality": self.name, "backbone": arch, "classes": list(classes),
                "preprocessing": {**asdict(prep), **self.options_json(options)}, "training": training,
                "versions": library_versions()}

    def preprocessing(self, meta: dict) -> ImagePreprocessing:
        return ImagePreprocessing.from_json(meta["preprocessing"])

    def rebuild(self, meta: dict):
        return create_backbone(meta["backbone"], num_classes=len(meta["classes"]), weights="none")

    def meta_problem(self, meta: dict) -> str | None:
        """Bounds of every number and enum of the backbone, classes and preprocessing: a tampered itfits.json fails
        here, in one line naming the key and what it may hold, not later as a 240 GB allocation."""
        prep, classes = meta["preprocessing"], meta["classes"]
        if "backbone" not in meta:
            return "itfits.json has no backbone"
        if meta["calibration"] is None:
            return "calibration is missing (only a regression model has none)"
        if len(classes) < 2 or len(classes) > MAX_CLASSES or len(set(classes)) != len(classes):
            return (f"classes must be 2 to {MAX_CLASSES} different names, got {len(classes)} "
                    f"({len(set(classes))} different)")
        if not isinstance(meta["backbone"], str):
            return f"backbone must be a backbone name, got {meta['backbone']!r}"
        try:  # a registered name, or a timm model name
            get_spec(meta["backbone"])
        except ItfitsError as e:
            return f"backbone: {e}"
        problem = (out_of_range("preprocessing.size", prep.get("size"), MIN_SIZE, MAX_SIZE, whole=True)
                   or one_of("preprocessing.resize", prep.get("resize"), RESIZE_METHODS)
                   or one_of("training.precision", meta.get("training", {}).get("precision", "fp32"), PRECISIONS))
        if problem:
            return problem
        for key, lo in (("mean", 0.0), ("std", 1e-3)):
            values = prep.get(key)
            if not (isinstance(values, list) and len(values) == 3):
                return f"preprocessing.{key} must be 3 numbers, got {values!r}"
            problem = next(filter(None, (out_of_range(f"preprocessing.{key}", v, lo, 1.0) for v in values)), None)
            if problem:
                return problem
        return None


IMAGES = register_modality(ImageModality())
