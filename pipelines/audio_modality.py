"""The audio modality: clips rendered to mel-spectrogram windows (audio.py), which train and predict as images
(image_modality): each window is an image in its clip's split, and a clip's outputs are the mean over its
windows (batches.audio_batches). Its options are the rendering, `MelConfig`, stored in the bundle."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from .audio import MelConfig, auto_duration, render_folder, source_files
from .batches import TTA_IMAGES_ONLY, audio_batches
from .errors import ItfitsError
from .image_modality import ImageModality
from .modality import register_modality
from .sources import AUDIO_EXTS, IMAGE_EXTS, data_exts, read_source


class AudioModality(ImageModality):
    name = "audio"
    what = "sound clips"
    exts = frozenset(AUDIO_EXTS)
    options = MelConfig
    augment = False  # no flips, rotations or warps on spectrograms: time runs one way and a frequency has one height
    train_unit = " windows"
    tta = False  # a spectrogram has a time direction: no mirror image (a clip's windows are averaged already)
    multi_label = False  # not yet: windows would need a clip's labels

    def claims(self, data: Path, target: str | None) -> bool:
        if target is not None:
            return False
        exts = data_exts(data)
        image, audio = sorted(exts & IMAGE_EXTS), sorted(exts & self.exts)
        if image and audio:
            raise ItfitsError(f"{data} holds both images ({', '.join(image)}) and audio ({', '.join(audio)}); train on "
                              "one kind: move the others out, or turn the audio into images first with: itfits "
                              "audio-to-images IN_DIR OUT_DIR")
        return bool(audio)

    def check_config(self, config) -> None:  # MelConfig checks itself
        if config.multi_label:
            raise ItfitsError("--multi-label is for images for now; audio trains one class per clip")

    def read_items(self, config, log):
        """Clips -> window images, each window in its clip's split; the window length chosen from the clips when
        --duration is auto."""
        files = read_source(config.data, exts=self.exts, valid_pct=config.valid_pct, seed=config.seed)
        mel, line = auto_duration(config.mel or MelConfig(), files.filter(pl.col("error").is_null())["path"].to_list())
        if line:
            log(line)
        items = self.usable(files, mel, config)
        files = source_files(items)
        log(f"{files['error'].is_null().sum()} clips -> {items['error'].is_null().sum()} mel-spectrogram windows "
            f"({items['cached'].sum()} of them from the cache)")
        return files, items, mel

    def usable(self, items: pl.DataFrame, options, config) -> pl.DataFrame:
        return render_folder(items, options, workers=None if config.num_workers is None else max(1, config.num_workers))

    def check_files(self, items: pl.DataFrame) -> pl.DataFrame:
        return items  # a clip is checked by rendering it: the batches give its error

    def batches(self, model, prep, items, *, options=None, batch_size: int = 64, num_workers: int | None = None,
                tta: bool = False, **fast):
        """batches.audio_batches (fp32: the model as calibrated; `fast`'s precision and layout do not apply)."""
        if tta:
            raise ItfitsError(TTA_IMAGES_ONLY)
        return audio_batches(model, prep, options, items, batch_size=batch_size, num_workers=num_workers)

    def scoring(self, bundle, prep, precision: str) -> dict:
        return {"model": bundle.scoring_model}

    def resolved_json(self, options, *, n_valid: int) -> dict:
        return {"mel": options.json(), "n_valid_clips": n_valid}

    def options_json(self, options) -> dict:
        return {"mel": options.json()}

    def bundle_options(self, meta: dict) -> MelConfig:
        return MelConfig.from_json(meta["preprocessing"]["mel"])

    def report_images(self, items: pl.DataFrame, paths: list[str]) -> list[str]:
        first_window = dict(items.select("path", "image").iter_rows())  # rendered for training, in the cache
        return [first_window[p] for p in paths]

    def preview(self, path: Path) -> str | None:
        return None

    def meta_problem(self, meta: dict) -> str | None:
        problem = super().meta_problem(meta)
        if problem:
            return problem
        mel = meta["preprocessing"].get("mel")
        if not isinstance(mel, dict):
            return f"preprocessing.mel must be a JSON object of mel parameters, got {mel!r}"
        try:
            MelConfig.from_json(mel)  # checks every parameter's range
        except (ItfitsError, TypeError, ValueError) as e:
            return f"preprocessing.mel is not a mel configuration ({e})"
        return None


AUDIO = register_modality(AudioModality())
