"""Audio end to end on real small audio: rendering (librosa-equal, cached, parallel), odd and broken clips,
fit -> bundle -> predict / evaluate through the CLI, audio-to-images, and the notebook."""
from __future__ import annotations

import html
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import soundfile as sf
from PIL import Image

from helpers import FASHION, REPO, run_cli, run_here
from pipelines.audio import (MAX_TRAIN_WINDOWS, AudioError, MelConfig, load_audio, mel_image, render_folder,
                             render_windows, split_windows)
from pipelines.errors import ItfitsError
from pipelines.sources import AUDIO_EXTS, read_source

AUDIO, AUDIO_UNKNOWN = REPO / "data" / "audio", REPO / "data" / "audio_unknown"
AUDIO_CLASSES = ["bass", "cymbal", "kick", "tabla"]
MEL = MelConfig(duration=1.0)  # the sample clips are short: 1 s windows keep the images mostly sound
# Small and quick; --lr given, so no lr_find; --workers 0: render and load in this process (2 shared cores)
AUDIO_FIT_ARGS = ["--epochs", "2", "--freeze-epochs", "1", "--size", "64", "--lr", "3e-3", "--workers", "0",
                  "--duration", "1"]
BASE_COLUMNS = ["path", "label", "confidence", "unknown", "error", "score"]


# ---- odd and broken clips -----------------------------------------------------------------------------------

def tone(seconds: float, sr: int = 22050, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.exp(-3 * (t % 1))).astype(np.float32)  # a decaying note each s


def write_odd_clips(folder: Path) -> dict[str, Path]:
    """Valid clips that break naive loaders, and one per format; {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {k: folder / n for k, n in [("stereo", "stereo_44k.wav"), ("rate8k", "rate_8k.wav"), ("short", "short.wav"),
                                      ("long", "long_12s.flac"), ("silent", "silent.wav")]}
    sf.write(out["stereo"], np.stack([tone(1.5, 44100), tone(1.5, 44100, 660)], 1), 44100)
    sf.write(out["rate8k"], tone(1.5, 8000), 8000)
    sf.write(out["short"], tone(0.2), 22050)
    sf.write(out["long"], tone(12.0), 22050)
    sf.write(out["silent"], np.zeros(22050, np.float32), 22050)
    for ext, fmt, subtype in [("wav", "WAV", None), ("flac", "FLAC", None), ("ogg", "OGG", "VORBIS"),
                              ("mp3", "MP3", "MPEG_LAYER_III"), ("aiff", "AIFF", None), ("aif", "AIFF", None)]:
        out[ext] = folder / f"format.{ext}"
        sf.write(out[ext], tone(1.2, 22050, 330), 22050, format=fmt, subtype=subtype)
    return out


# file name -> a word its skip reason / error must contain
BROKEN_AUDIO = {"zero_bytes.wav": "empty", "text_named.wav": "cannot decode", "truncated.flac": "cannot decode",
                "header_only.wav": "no audio samples"}


def write_broken_clips(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero_bytes.wav").write_bytes(b"")
    (folder / "text_named.wav").write_text("this is not audio\n")
    sf.write(folder / "whole.flac", tone(2.0), 22050)
    flac = (folder / "whole.flac").read_bytes()
    (folder / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(folder / "whole.wav", tone(1.0), 22050)
    (folder / "header_only.wav").write_bytes((folder / "whole.wav").read_bytes()[:44])
    for name in ("whole.flac", "whole.wav"):
        (folder / name).unlink()
    return {name: folder / name for name in BROKEN_AUDIO}


@pytest.fixture(scope="module")
def odd_clips(tmp_path_factory) -> dict[str, Path]:
    return write_odd_clips(tmp_path_factory.mktemp("odd_audio"))


@pytest.fixture(scope="module")
def broken_clips(tmp_path_factory) -> dict[str, Path]:
    return write_broken_clips(tmp_path_factory.mktemp("broken_audio"))


# ---- rendering -------------------------------------------------------------------------------------------------

def librosa_reference(y: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """The plain librosa computation of one zero-padded window, scaled as itfits documents it."""
    import librosa
    window = np.zeros(cfg.window_samples, np.float32)
    window[:len(y)] = y[:cfg.window_samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_fft larger than a very short input
        S = librosa.feature.melspectrogram(y=window, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                           n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    db = librosa.power_to_db(S, ref=np.max, amin=1e-10, top_db=cfg.top_db)
    return np.rint((db + cfg.top_db) * 255 / cfg.top_db)[::-1].clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("cfg", [MelConfig(duration=5.0), MelConfig(duration=1, n_mels=64, fmin=50, fmax=8000, hop_length=256, n_fft=1024),
                                 MelConfig(sample_rate=8000, n_fft=500, hop_length=123, duration=1.3)])
def test_mel_image_equals_librosa(cfg):
    rng = np.random.default_rng(0)
    for n in (1, 100, 958, 5000, 22050, 10 ** 6):
        y = (rng.standard_normal(n) * np.exp(-np.arange(n) / 3000)).astype(np.float32)
        img = mel_image(y, cfg)
        assert img.dtype == np.uint8 and img.shape == (cfg.n_mels, 1 + cfg.window_samples // cfg.hop_length)
        np.testing.assert_array_equal(img, librosa_reference(y, cfg))


def test_low_frequencies_are_at_the_bottom():
    cfg = MelConfig(duration=1.0)
    img = mel_image(tone(1.0, freq=100.0), cfg).astype(float)
    rows = img.mean(1)
    assert rows.argmax() > cfg.n_mels * 3 // 4, "a 100 Hz tone must light the bottom rows"


def test_silent_and_quiet_windows_do_not_divide_by_zero():
    cfg = MelConfig(duration=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (division by zero, NaN) fails the test
        silent = mel_image(np.zeros(22050, np.float32), cfg)
        tiny = mel_image(np.full(22050, 1e-30, np.float32), cfg)
        quiet = mel_image(tone(1.0) * 1e-4, cfg)
    assert not silent.any() and not tiny.any()
    assert quiet.max() == 255, "loudness is relative to each window's peak"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loud = mel_image(tone(1.0) * np.float32(1e30), cfg)  # a float WAV can hold it; its power overflows float32
    assert np.abs(loud.astype(int) - mel_image(tone(1.0), cfg)).max() <= 1, "a loud clip is rendered, not black"


def test_odd_clips_become_mono_windows_at_the_configured_rate(odd_clips):
    cfg = MelConfig(duration=5.0)
    assert load_audio(odd_clips["stereo"], cfg).ndim == 1
    assert len(load_audio(odd_clips["stereo"], cfg)) == round(1.5 * 22050)  # 44.1 kHz -> 22.05 kHz
    assert len(load_audio(odd_clips["rate8k"], cfg)) == round(1.5 * 22050)  # 8 kHz -> 22.05 kHz
    width = 1 + cfg.window_samples // cfg.hop_length
    short = render_windows(odd_clips["short"], cfg)
    assert len(short) == 1 and short[0].shape == (128, width), "a 0.2 s clip is padded to one full window"
    assert short[0][:, width // 2:].max() == 0, "the padding is silence"
    long = render_windows(odd_clips["long"], cfg)
    assert len(long) == 2 and all(w.shape == (128, width) for w in long), "12 s = 2 windows of 5 s (2 s rest dropped)"
    assert len(render_windows(odd_clips["long"], MelConfig(duration=4.0))) == 3
    assert len(render_windows(odd_clips["long"], MelConfig(duration=1.0), max_windows=8)) == 8
    assert not render_windows(odd_clips["silent"], cfg)[0].any()


def test_split_windows_keeps_a_long_rest_and_drops_a_short_one():
    cfg = MelConfig(duration=1.0)
    n = cfg.window_samples
    assert [len(w) for w in split_windows(np.ones(2 * n + n // 2 + 10), cfg)] == [n, n, n // 2 + 10]
    assert [len(w) for w in split_windows(np.ones(2 * n + n // 4), cfg)] == [n, n]
    assert [len(w) for w in split_windows(np.ones(n // 4), cfg)] == [n // 4]


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3", "aiff", "aif"])
def test_every_listed_format_decodes(odd_clips, ext):
    assert odd_clips[ext].suffix == f".{ext}" and f".{ext}" in AUDIO_EXTS
    y = load_audio(odd_clips[ext], MelConfig())
    assert abs(len(y) / 22050 - 1.2) < 0.1 and np.abs(y).max() > 0.1  # mp3 adds encoder padding


def test_broken_clips_raise_audio_errors_with_reasons(broken_clips):
    for name, word in BROKEN_AUDIO.items():
        with pytest.raises(AudioError) as e:
            render_windows(broken_clips[name], MelConfig())
        assert word in str(e.value), f"{name}: {e.value}"
    with pytest.raises(AudioError, match="not found"):
        load_audio("no/such/file.wav", MelConfig())


def test_file_names_that_are_not_utf8_decode(tmp_path):
    """libsndfile is handed such a name as strict UTF-8; the items table holds it as \\xNN (sources.text_path)."""
    import os
    from pipelines.sources import text_path
    raw = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"cl\xe9ip.flac"))  # Python's surrogate-escaped name
    shutil.copy(sorted(AUDIO.rglob("*.flac"))[0], raw)
    assert text_path(raw).endswith("cl\\xe9ip.flac")
    for path in (raw, text_path(raw)):
        assert len(load_audio(path, MEL)) > 0


# ---- the cache and the split -------------------------------------------------------------------------------

def _items(paths: list[Path], label="x", split="train") -> pl.DataFrame:
    return pl.DataFrame({"path": [str(p) for p in paths], "label": label, "split": split, "error": None},
                        schema_overrides={"error": pl.String})


def test_second_render_uses_the_cache_and_new_parameters_render_again(tmp_path):
    clips = sorted(AUDIO.rglob("*.flac"))[:12]
    first = render_folder(_items(clips), MEL, cache=tmp_path, workers=2, progress=False)  # the process pool
    assert first["error"].null_count() == first.height and not first["cached"].any()
    assert first["source"].unique(maintain_order=True).to_list() == [str(p) for p in clips], "clips in order"
    assert first.height > len(clips), "the bass clips (up to 4 s) have several 1 s windows"
    mtimes = {p: Path(p).stat().st_mtime_ns for p in first["path"]}
    second = render_folder(_items(clips), MEL, cache=tmp_path, workers=2, progress=False)
    assert second["cached"].all() and second["path"].to_list() == first["path"].to_list()
    assert {p: Path(p).stat().st_mtime_ns for p in second["path"]} == mtimes, "nothing rewritten"
    other = render_folder(_items(clips), MelConfig(duration=1.0, n_mels=64), cache=tmp_path, workers=1, progress=False)
    assert not other["cached"].any() and not set(other["path"]) & set(first["path"])
    assert Image.open(other["path"][0]).size == (44, 64) and Image.open(first["path"][0]).size == (44, 128)
    copy = tmp_path / "renamed.flac"  # the key is the content, not the name
    shutil.copyfile(clips[0], copy)
    assert render_folder(_items([copy]), MEL, cache=tmp_path, workers=1, progress=False)["cached"].all()


def test_cached_pngs_hold_the_rendered_windows(tmp_path, odd_clips):
    windows = render_folder(_items([odd_clips["long"]]), MEL, cache=tmp_path, progress=False)
    assert windows["window"].to_list() == list(range(MAX_TRAIN_WINDOWS)), "long clips are capped for training"
    for png, img in zip(windows["path"], render_windows(odd_clips["long"], MEL)):
        np.testing.assert_array_equal(np.asarray(Image.open(png)), img)


def test_windows_of_a_clip_share_its_split(tmp_path, odd_clips, broken_clips):
    data = tmp_path / "data"
    for label in ("a", "b"):
        for i, kind in enumerate(["long", "stereo", "rate8k", "short", "ogg", "mp3"]):
            (data / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(odd_clips[kind], data / label / f"{i}_{odd_clips[kind].name}")
    shutil.copyfile(broken_clips["text_named.wav"], data / "a" / "text_named.wav")
    items = read_source(data, exts=AUDIO_EXTS, valid_pct=0.5, seed=0)
    windows = render_folder(items, MEL, cache=tmp_path / "cache", workers=1, progress=False)
    per_clip = windows.group_by("source").agg(pl.col("split").n_unique(), pl.len())
    assert (per_clip["split"] == 1).all(), "windows of one clip never straddle train and valid"
    assert per_clip["len"].max() == MAX_TRAIN_WINDOWS
    assert set(windows["split"]) == {"train", "valid"}
    bad = windows.filter(pl.col("error").is_not_null())
    assert bad["source"].to_list() == [str((data / "a" / "text_named.wav").resolve())]


# ---- fit -> predict / evaluate through the CLI --------------------------------------------------------------

@dataclass(frozen=True)
class AudioRun:
    run: Path
    data: Path
    broken: dict[str, Path]
    odd: dict[str, Path]
    stdout: str

    @property
    def model(self) -> Path:
        return self.run / "model"


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory, odd_clips, broken_clips) -> AudioRun:
    """`itfits fit` on a copy of data/audio with broken clips and odd-but-valid clips mixed into the classes."""
    root = tmp_path_factory.mktemp("audio_run")
    data = root / "audio"
    shutil.copytree(AUDIO, data)
    broken = {}
    for i, (name, path) in enumerate(sorted(broken_clips.items())):
        broken[name] = data / AUDIO_CLASSES[i % 4] / name
        shutil.copyfile(path, broken[name])
    odd = {}
    for kind in ("stereo", "rate8k", "short", "long", "mp3", "ogg", "aiff"):
        odd[kind] = data / "tabla" / odd_clips[kind].name
        shutil.copyfile(odd_clips[kind], odd[kind])
    run = root / "run"
    proc = run_here("fit", data, "--out", run, *AUDIO_FIT_ARGS, "--unknown", AUDIO_UNKNOWN)
    assert proc.returncode == 0, f"itfits fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return AudioRun(run=run, data=data, broken=broken, odd=odd, stdout=proc.stdout)


def test_fit_writes_an_audio_bundle(audio_run):
    for name in ["model/model.safetensors", "model/itfits.json", "history.csv", "confusion_matrix.csv", "run.json",
                 "skipped.csv"]:
        assert (audio_run.run / name).is_file(), f"{name} missing from the run folder"
    meta = json.loads((audio_run.model / "itfits.json").read_text())
    assert meta["modality"] == "audio" and meta["classes"] == AUDIO_CLASSES
    assert meta["preprocessing"]["mel"] == MEL.json() and meta["preprocessing"]["size"] == 64
    assert not [p for p in audio_run.model.iterdir() if p.suffix in (".pkl", ".pth", ".pt", ".pickle")]
    summary = json.loads((audio_run.run / "run.json").read_text())
    assert summary["config"]["mel"]["duration"] == 1.0 and summary["resolved"]["mel"] == MEL.json()
    assert summary["calibration"]["score_chosen_by"] == "best AUROC on the --unknown examples"


def test_fit_skips_broken_clips_with_reasons_and_uses_odd_ones(audio_run):
    skipped = pl.read_csv(audio_run.run / "skipped.csv")
    by_name = {Path(p).name: (label, err) for p, label, err in skipped.select("path", "label", "error").iter_rows()}
    assert set(by_name) == set(BROKEN_AUDIO), "exactly the broken clips are skipped, the odd valid ones are used"
    for name, word in BROKEN_AUDIO.items():
        assert word in by_name[name][1], f"{name}: reason {by_name[name][1]!r} should say {word!r}"
        assert by_name[name][0] == audio_run.broken[name].parent.name
    n_good = sum(1 for _ in AUDIO.rglob("*.flac")) + len(audio_run.odd)
    assert f"{n_good} files in 4 classes" in audio_run.stdout and f"{len(BROKEN_AUDIO)} skipped" in audio_run.stdout


def test_report_shows_top_loss_clips_as_their_first_spectrogram(audio_run):
    """Each top-loss card: the clip's file name, and a thumbnail of its first window's spectrogram (the PNG that
    training rendered into the cache)."""
    from pipelines.reports import thumbnail_uri
    page = (audio_run.run / "report.html").read_text()
    top = pl.read_csv(audio_run.run / "top_losses.csv")
    windows = render_folder(read_source(audio_run.data, exts=AUDIO_EXTS), MEL, workers=1, progress=False)  # cached
    first = dict(windows.filter(pl.col("window") == 0).select("source", "path").iter_rows())
    section = page.split("losses (validation)</h2>", 1)[1].split("<h2>", 1)[0]
    assert top.height > 0 and section.count("data:image/png;base64,") == top.height
    for clip in top["name"]:
        assert html.escape(Path(clip).name) in section
        assert thumbnail_uri(first[clip]) in section, f"{clip}: not its first window's spectrogram"


def test_a_second_fit_renders_nothing(audio_run, mel_cache):
    """What a second `itfits fit` on the same folder renders: its render_folder call, on the same cache."""
    items = read_source(audio_run.data, exts=AUDIO_EXTS)
    windows = render_folder(items, MEL, workers=1, progress=False)
    ok = windows.filter(pl.col("error").is_null())
    assert ok.height > 60 and ok["cached"].all()
    assert all(Path(p).is_relative_to(mel_cache) for p in ok["path"]), "ITFITS_CACHE decides where the cache is"


@pytest.fixture(scope="module")
def audio_predictions(audio_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("audio_preds") / "p.csv"
    proc = run_here("predict", audio_run.model, AUDIO, AUDIO_UNKNOWN, audio_run.odd["long"],
                   audio_run.broken["text_named.wav"], "--out", out, "--workers", "0", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pl.read_csv(out), proc.stdout


def test_predict_gives_one_row_per_clip(audio_predictions):
    df, stdout = audio_predictions
    n_known, n_unknown = sum(1 for _ in AUDIO.rglob("*.flac")), sum(1 for _ in AUDIO_UNKNOWN.rglob("*.flac"))
    assert df.height == n_known + n_unknown + 2, "one row per file, the 12 s clip included once"
    assert df.columns[:6] == BASE_COLUMNS and "top3_prob" in df.columns
    assert df.filter(pl.col("path").str.ends_with("long_12s.flac"))["error"].is_null().all()
    errors = df.filter(pl.col("error").is_not_null())
    assert errors["path"].to_list()[0].endswith("text_named.wav") and errors.height == 1
    assert "cannot decode" in errors["error"][0] and errors["label"].is_null().all()
    assert f"{df.height} files" in stdout and "1 errors" in stdout


def test_predict_flags_like_images_and_is_mostly_right(audio_predictions):
    df = audio_predictions[0].filter(pl.col("error").is_null())
    assert ((df["label"] == "unknown") == df["unknown"]).all()
    known = df.filter(~pl.col("unknown"))
    assert (known["label"] == known["top1"]).all()
    assert set(df["top1"]) <= set(AUDIO_CLASSES)
    assert ((df["confidence"] > 0) & (df["confidence"] <= 1)).all()
    sample = df.filter(pl.col("path").str.contains("/data/audio/"))
    truth = sample["path"].map_elements(lambda p: Path(p).parent.name, return_dtype=pl.String)
    acc = (sample["top1"] == truth).mean()
    assert acc > 0.55, f"accuracy {acc} on the sample clips (4 classes; the largest is 43%)"


def test_predict_averages_a_clips_windows_as_training_saw_them(audio_run, tmp_path):
    """A 3-window clip: its row averages the model's outputs (probabilities, features) on the 3 cached PNGs the
    Learner trains on."""
    from pipelines.batches import audio_batches
    from pipelines.bundle import load_bundle
    from pipelines.images import ImagePreprocessing
    from pipelines.batches import image_batches

    bundle = load_bundle(audio_run.model)
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    clip = tmp_path / "three.wav"
    sf.write(clip, np.concatenate([tone(1.0, freq=f) for f in (110, 880, 3000)]), 22050)
    pngs = render_folder(_items([clip]), bundle.mel, cache=tmp_path, workers=1, progress=False)["path"].to_list()
    assert len(pngs) == 3
    _, w_logits, w_feats, _ = next(image_batches(bundle.model, prep, [(p, None) for p in pngs], num_workers=0))
    batches = list(audio_batches(bundle.model, prep, bundle.mel, [(str(clip), None)], num_workers=0, batch_size=2))
    assert len(batches) == 1
    paths, logits, feats, errors = batches[0]
    assert paths == [str(clip)] and errors == [""] and logits.shape == (1, len(AUDIO_CLASSES))
    window_probs = np.exp(w_logits - w_logits.max(1, keepdims=True))
    window_probs /= window_probs.sum(1, keepdims=True)
    np.testing.assert_allclose(np.exp(logits[0]), window_probs.mean(0), atol=1e-4)  # the mean of window probabilities
    # the windows go through the model 2 at a time here and 3 at once above: the convolutions round differently,
    # by about 1e-5 of the features' scale
    np.testing.assert_allclose(feats[0], w_feats.mean(0), atol=1e-4 * np.abs(w_feats).max())


def test_predict_groups_clips_by_their_windows(audio_run, tmp_path):
    """Clips are grouped until their windows fill a batch, so memory holds a batch's windows, not batch_size
    clips of any length; grouping does not change a clip's outputs, and an unreadable clip keeps its row."""
    from pipelines.batches import audio_batches
    from pipelines.bundle import load_bundle
    from pipelines.images import ImagePreprocessing

    bundle = load_bundle(audio_run.model)
    prep = ImagePreprocessing.from_json(bundle.meta["preprocessing"])
    sf.write(tmp_path / "one.wav", tone(1.0, freq=220), 22050)
    sf.write(tmp_path / "three.wav", np.concatenate([tone(1.0, freq=f) for f in (110, 880, 3000)]), 22050)
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    items = [(str(tmp_path / n), None) for n in ("one.wav", "three.wav", "broken.wav")]
    small = list(audio_batches(bundle.model, prep, bundle.mel, items, num_workers=0, batch_size=2))
    whole = list(audio_batches(bundle.model, prep, bundle.mel, items, num_workers=0, batch_size=64))
    assert [b[0] for b in small] == [[items[0][0], items[1][0]], [items[2][0]]] and len(whole) == 1
    assert [e for b in small for e in b[3]] == whole[0][3] and whole[0][3][:2] == ["", ""] and whole[0][3][2]
    logits, feats = np.concatenate([b[1] for b in small]), np.concatenate([b[2] for b in small])
    np.testing.assert_allclose(np.exp(logits[:2]), np.exp(whole[0][1][:2]), atol=1e-4)
    np.testing.assert_allclose(feats[:2], whole[0][2][:2], atol=1e-4 * np.abs(feats).max())


def test_evaluate_an_audio_bundle(audio_run, tmp_path):
    from pipelines.evaluate import evaluate
    m = evaluate(audio_run.model, AUDIO, out=tmp_path, unknown=AUDIO_UNKNOWN, num_workers=0)
    assert m["n_known"] == sum(1 for _ in AUDIO.rglob("*.flac"))
    assert m["n_unknown"] == sum(1 for _ in AUDIO_UNKNOWN.rglob("*.flac"))
    assert set(m["scores"]) >= {"knn", "max_softmax"} and 0 <= m["accuracy"] <= 1
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "reliability.png").is_file()
    page = (tmp_path / "report.html").read_text()  # the page of clips: its plots, and no picture of a clip
    assert "catches" in page and (tmp_path / "roc.png").is_file() and 'alt="thumbnail' not in page


# ---- audio-to-images and user errors ---------------------------------------------------------------------------

def test_audio_to_images_mirrors_the_folder(tmp_path, odd_clips, broken_clips):
    src = tmp_path / "in"
    for label in ("kick", "cymbal"):
        shutil.copytree(AUDIO / label, src / label)
    shutil.copyfile(odd_clips["long"], src / "kick" / "long.flac")
    shutil.copyfile(odd_clips["short"], src / "kick" / "long.wav")  # same stem, other format
    shutil.copyfile(broken_clips["text_named.wav"], src / "cymbal" / "text_named.wav")
    out = tmp_path / "out"
    proc = run_cli("audio-to-images", src, out, "--duration", "2", "--max-windows", "3", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_sample = len(list((AUDIO / "kick").iterdir())) + len(list((AUDIO / "cymbal").iterdir()))  # one window each
    n_clips = n_sample + 2
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == n_sample + 3 + 1, "one PNG per window: the long clip has 3, the short one 1, the text file none"
    assert {p.parent.name for p in pngs} == {"kick", "cymbal"}
    assert (out / "kick" / "long_002.png").is_file() and (out / "kick" / "long_wav_000.png").is_file()
    assert Image.open(pngs[0]).size == (1 + MelConfig(duration=2).window_samples // 512, 128)
    index = pl.read_csv(out / "windows.csv")
    assert index.height == len(pngs) and set(index.columns) == {"image", "source", "window"}
    assert pl.read_csv(out / "skipped.csv")["source"].to_list() == [str(src / "cymbal" / "text_named.wav")]
    assert f"{n_clips} clips -> {len(pngs)} images" in proc.stdout and "1 skipped" in proc.stdout
    again = run_here("audio-to-images", src, out)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 1 and len(errors) == 1 and "not an empty folder" in errors[0]
    assert "Traceback" not in again.stderr


def test_mel_options_are_checked():
    for kwargs, option in [({"n_mels": 4}, "--n-mels"), ({"fmax": 20000}, "--fmax"), ({"fmin": 9000, "fmax": 8000}, "--fmin"),
                           ({"duration": 0.01}, "--duration"), ({"top_db": 0}, "--top-db"), ({"hop_length": 0}, "--hop-length")]:
        with pytest.raises(ItfitsError, match=option):
            MelConfig(**kwargs)
    five = MelConfig(duration=5.0)
    assert five.key() != MelConfig(duration=5.0, top_db=60).key() and MelConfig(fmin=0, duration=5).key() == five.key()
    assert MelConfig(duration=1.0).key() != five.key(), "the cache key holds the window duration"
    with pytest.raises(ItfitsError, match="'auto'.*--duration SECONDS"):
        MelConfig().key()


def test_duration_auto_fits_the_window_to_the_clips(tmp_path):
    """--duration auto (the default): short clips get a short window, longer ones a longer window, printed, in
    run.json's resolved.mel and rendered so; a given --duration is kept."""
    from pipelines.audio import DURATION_BOUNDS, DURATION_STEP, auto_duration, clip_seconds
    from pipelines.modality import get_modality
    from pipelines.prepare import prepare_data
    from pipelines.run import FitConfig
    short = tmp_path / "short"
    for label in ("kick", "tabla"):  # the sample clips cut to their first 0.3 s: one-shots
        for clip in sorted((AUDIO / label).iterdir())[:4]:
            y, sr = sf.read(clip)
            (short / label).mkdir(parents=True, exist_ok=True)
            sf.write(short / label / clip.with_suffix(".wav").name, y[:int(0.3 * sr)], sr)
    lines = []
    data = prepare_data(get_modality("audio"), FitConfig(data=str(short), out=str(tmp_path / "run"), num_workers=0),
                        tmp_path / "run", log=lines.append)
    assert data.options.duration == DURATION_BOUNDS[0], "0.3 s clips: the shortest window"
    assert any(f"audio window {DURATION_BOUNDS[0]:g} s (--duration auto" in line for line in lines), lines
    widths = {Image.open(p).size[0] for p in data.files["image"]}
    assert widths == {1 + data.options.window_samples // data.options.hop_length}
    clips = [str(p) for p in sorted(AUDIO.rglob("*.flac"))]
    lengths = [clip_seconds(c) for c in clips]
    cfg, line = auto_duration(MelConfig(), clips)
    assert np.median(lengths) <= cfg.duration < np.median(lengths) + DURATION_STEP and cfg.duration > data.options.duration
    assert str(cfg.duration) in line or f"{cfg.duration:g}" in line
    assert auto_duration(MelConfig(duration=2.0), clips) == (MelConfig(duration=2.0), ""), "a given duration is kept"
    proc = run_here("audio-to-images", short, tmp_path / "pngs", "--duration", "soon")
    assert proc.returncode == 1 and "--duration must be auto or a number of seconds" in proc.stderr


def test_mel_options_on_images_and_mixed_folders_are_refused(tmp_path):
    from pipelines.modality import modality_for
    from pipelines.prepare import prepare_data
    from pipelines.run import FitConfig

    def detected(data):
        return modality_for(data).name
    config = FitConfig(data=str(FASHION), out=str(tmp_path), mel=MEL)
    with pytest.raises(ItfitsError, match="for audio"):
        prepare_data(modality_for(FASHION), config, tmp_path)
    mixed = tmp_path / "mixed"
    shutil.copytree(AUDIO / "kick", mixed / "kick")
    shutil.copytree(FASHION / "bag", mixed / "bag")
    with pytest.raises(ItfitsError, match="audio-to-images"):
        detected(mixed)
    assert detected(AUDIO) == "audio" and detected(FASHION) == "image"
    table = tmp_path / "clips.csv"
    pl.DataFrame({"path": [str(p) for p in sorted(AUDIO.rglob("*.flac"))], "label": "x"}).write_csv(table)
    assert detected(table) == "audio"
