"""Audio -> mel-spectrogram images (librosa), cached by content, so the image pipeline trains on them.

A clip is loaded as mono at the config's sample rate, cut into fixed windows of `duration` seconds (the last
or only one padded with silence), and each window becomes one grayscale image: rows are mel bands (low
frequencies at the bottom), columns are frames, 255 is the window's loudest point and 0 is `top_db` below
it. Training renders PNGs into a cache keyed by file content and `MelConfig`; prediction renders the same
arrays in memory and averages the model's outputs over a clip's windows.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

from . import logs  # as a module: _render_all has a `progress` flag
from .errors import ItfitsError, ItfitsWarning
from .io import atomic_dir, write_csv
from .sources import AUDIO_EXTS, expand_inputs, not_a_file, not_found, os_path, text_path

RENDER_VERSION = 1  # part of the cache key: bump when the rendering below changes its output
MAX_TRAIN_WINDOWS = 8  # windows of one clip used for training: the first 8 x duration seconds
POWER_FLOOR = 1e-10  # librosa's amin: a window whose peak power is below it is silence, rendered black
# --duration auto: the window is this percentile of the clips' lengths, rounded up to DURATION_STEP, within
# DURATION_BOUNDS. The median, not a high percentile: a window fitted to the longest clips leaves the typical one mostly
# silence (drum one-shots, median 1.0 s and 95th percentile 9.6 s: 0.69 accuracy in 5 s windows, 0.85 in 1 s ones),
# while a clip longer than the window gives several windows, averaged at prediction.
DURATION_PERCENTILE = 50
DURATION_STEP = 0.25  # seconds
DURATION_BOUNDS = (0.5, 10.0)  # seconds


class AudioError(ValueError):
    """Why one file cannot be used; recorded in the file's `error`, never raised to the user."""


@dataclass(frozen=True)
class MelConfig:
    """How a clip becomes images; stored in the bundle (preprocessing.mel) so prediction renders the same."""
    sample_rate: int = 22050  # Hz; every clip is resampled to it
    n_fft: int = 2048  # STFT window in samples
    hop_length: int = 512  # samples between frames: image width = duration * sample_rate / hop_length + 1
    n_mels: int = 128  # mel bands: the image height
    fmin: float = 0.0  # Hz, lowest band edge
    fmax: float | None = None  # Hz, highest band edge; None: sample_rate / 2
    duration: float | None = None  # seconds per window; shorter clips padded, longer ones cut into windows; None
    # ("auto"): chosen from the clips' lengths by `auto_duration` before anything is rendered
    top_db: float = 80.0  # dB below each window's peak that map to black

    def __post_init__(self):
        for name, kind in (("sample_rate", int), ("n_fft", int), ("hop_length", int), ("n_mels", int), ("fmin", float),
                           ("top_db", float)) + tuple((n, float) for n in ("fmax", "duration") if getattr(self, n) is not None):
            object.__setattr__(self, name, kind(getattr(self, name)))  # fmin=0 and fmin=0.0: one config, one key

        def need(ok: bool, option: str, value, what: str):
            if not ok:
                raise ItfitsError(f"{option} must be {what}, got {value}")
        # upper bounds too: a bundle's itfits.json sets these, and 1e9 Hz or 1e6 mel bands would only exhaust memory
        need(1000 <= self.sample_rate <= 384_000, "--sample-rate", self.sample_rate, "in [1000, 384000] Hz")
        need(16 <= self.n_fft <= 65_536, "--n-fft", self.n_fft, "in [16, 65536] samples")
        need(1 <= self.hop_length <= self.n_fft, "--hop-length", self.hop_length, f"in [1, n_fft = {self.n_fft}] samples")
        need(8 <= self.n_mels <= 1024, "--n-mels", self.n_mels, "in [8, 1024]")
        need(self.duration is None or self.duration <= 600, "--duration", self.duration, "at most 600 s")
        need(self.duration is None or self.duration * self.sample_rate >= self.n_fft, "--duration", self.duration,
             f"at least n_fft / sample_rate = {self.n_fft / self.sample_rate:.3g} s")
        need(0 < self.top_db <= 400, "--top-db", self.top_db, "in (0, 400] dB")
        nyquist = self.sample_rate / 2
        need(self.fmax is None or 0 < self.fmax <= nyquist, "--fmax", self.fmax, f"in (0, sample_rate / 2 = {nyquist:g}]")
        need(0 <= self.fmin < (self.fmax or nyquist), "--fmin", self.fmin, f"in [0, fmax = {self.fmax or nyquist:g})")

    def json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "MelConfig":
        return cls(**d)

    def key(self) -> str:
        """Short hash of the parameters (the duration too) and the rendering version: the cache folder of this config."""
        self._check_resolved()
        text = json.dumps({**asdict(self), "render_version": RENDER_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def window_samples(self) -> int:
        self._check_resolved()
        return round(self.duration * self.sample_rate)

    def _check_resolved(self) -> None:
        if self.duration is None:  # a bundle always holds a number: auto is chosen at fit
            raise ItfitsError("the mel window duration is 'auto', which is chosen from the training clips "
                              "(audio.auto_duration); give --duration SECONDS, or a bundle that holds one")


def clip_seconds(path: str) -> float | None:
    """A clip's length from its header (libsndfile), or None when that cannot tell (the clip's error comes when it
    is rendered)."""
    import soundfile
    if not_a_file(os_path(path)):  # a FIFO would block the header read forever
        return None
    try:
        return float(soundfile.info(os_path(path)).duration)
    except Exception:  # libsndfile raises several types; an unreadable file just has no length here
        return None


def auto_duration(cfg: MelConfig, paths: list[str]) -> tuple[MelConfig, str]:
    """(cfg with its duration chosen from the lengths of the clips at `paths`, a line saying what was chosen and
    why). A cfg with a duration is returned as it is, with an empty line."""
    if cfg.duration is not None:
        return cfg, ""
    lengths = [s for s in map(clip_seconds, paths) if s]
    low, high = DURATION_BOUNDS
    low = max(low, np.ceil(cfg.n_fft / cfg.sample_rate / DURATION_STEP) * DURATION_STEP)  # a window holds one FFT
    if not lengths:
        chosen, why = 5.0, "no clip's length could be read from its header; 5 s"  # the former fixed default
    else:
        typical = float(np.percentile(lengths, DURATION_PERCENTILE))
        chosen = float(min(max(np.ceil(typical / DURATION_STEP - 1e-9) * DURATION_STEP, low), high))
        why = (f"{DURATION_PERCENTILE}th percentile of {len(lengths)} clips' lengths {typical:.2f} s, rounded up to "
               f"{DURATION_STEP:g} s, within {low:g}..{high:g} s")
    return replace(cfg, duration=chosen), f"audio window {chosen:g} s (--duration auto: {why})"


# ---- one clip -> window images -------------------------------------------------------------------------------

def _decode_reason(e: BaseException) -> str:
    """The most telling message in an exception chain: libsndfile's when it tried (audioread's are often empty)."""
    err = e
    while err is not None:
        if hasattr(err, "error_string"):  # soundfile.LibsndfileError
            return err.error_string
        err = err.__context__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


MAX_DURATION = 7200.0  # seconds of a clip read at most by default (--max-duration): 2 h decode to about 0.6 GB
# decoded samples (at the model's rate) one byte of a file may give: FLAC's silence packs about 500 into a byte; a WAV
# whose header claims 1 Hz gives 22,050 (6 h from 44 KB), which the header check refuses before decoding
MAX_SAMPLES_PER_BYTE = 4096
_max_duration = [MAX_DURATION]


def set_max_duration(seconds: float) -> None:
    """The longest clip read (`--max-duration`); longer ones are refused from their header, before decoding."""
    if not (isinstance(seconds, (int, float)) and 1 <= seconds <= 366 * 86400):
        raise ItfitsError(f"--max-duration must be a number of seconds in [1, 31622400], got {seconds}")
    _max_duration[0] = float(seconds)


def _check_header(source, size: int, cfg: MelConfig, max_seconds: float | None) -> None:
    """An AudioError for a clip whose header says it lasts longer than --max-duration, or that claims more samples
    than a file of `size` bytes can give (a forged sample rate): refused before anything is decoded."""
    import soundfile
    try:
        info = soundfile.info(source)
        frames, rate = int(info.frames), float(info.samplerate)
    except Exception:  # no header libsndfile reads: decoding gives the reason, and librosa stops at the duration
        return
    finally:
        if hasattr(source, "seek"):
            source.seek(0)
    if frames <= 0 or rate <= 0 or frames > 2**62:  # an unknown length (a stream) or nonsense: decoding tells
        return
    seconds, limit = frames / rate, _max_duration[0]
    if seconds > limit:
        raise AudioError(f"the clip lasts {seconds:,.0f} s by its header ({frames:,} samples at {rate:g} Hz), over "
                         f"--max-duration {limit:g} s; cut it, or raise --max-duration")
    decoded = min(seconds, max_seconds or seconds) * cfg.sample_rate
    if decoded > MAX_SAMPLES_PER_BYTE * max(size, 1):
        raise AudioError(f"its header claims {frames:,} samples at {rate:g} Hz ({seconds:,.0f} s), more than a file of "
                         f"{size:,} bytes can hold: a damaged or forged header")


def load_audio(path: str | Path, cfg: MelConfig, *, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 samples at cfg.sample_rate (stereo averaged, any rate resampled), at most `max_seconds`.
    Raises AudioError with the reason when the file cannot be used."""
    import librosa
    p = Path(os_path(str(path)))
    special = not_a_file(p)
    if special:
        raise AudioError(special)
    if p.stat().st_size == 0:
        raise AudioError("empty file (0 bytes)")
    # soundfile hands libsndfile the name as strict UTF-8: a name that is not UTF-8 goes as an open file instead
    utf8 = text_path(str(p)) == str(p)
    with warnings.catch_warnings(), (nullcontext(p) if utf8 else open(p, "rb")) as source:
        warnings.simplefilter("ignore")  # "PySoundFile failed. Trying audioread instead." and its FutureWarning
        _check_header(source, p.stat().st_size, cfg, max_seconds)
        try:
            y, _ = librosa.load(source, sr=cfg.sample_rate, mono=True,
                                duration=min(max_seconds or _max_duration[0], _max_duration[0]))
        except Exception as e:  # libsndfile, audioread and librosa raise many types; the reason goes in the table
            reason = _decode_reason(e)
            if "possibly a pipe" in reason:  # libsndfile's words for a format it does not know; the file is regular
                reason = "not a format libsndfile or audioread can decode (unknown or damaged)"
            raise AudioError(f"cannot decode as audio: {reason}") from e
    if y.size == 0:
        raise AudioError("no audio samples in the file")
    return y


def split_windows(y: np.ndarray, cfg: MelConfig) -> list[np.ndarray]:
    """Consecutive windows of cfg.duration, the last one shorter (mel_image pads it with silence). A remnant
    shorter than half a window after full ones is dropped (its image would be mostly padding)."""
    n = cfg.window_samples
    return [y[s:s + n] for s in range(0, len(y), n) if s == 0 or len(y) - s >= n / 2]


@lru_cache(maxsize=8)
def _mel_basis(cfg: MelConfig) -> np.ndarray:
    import librosa
    return librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)


@lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    import librosa
    return librosa.filters.get_window("hann", n_fft, fftbins=True)  # float64, what librosa.stft uses


def mel_image(segment: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """(n_mels, frames) uint8 image of one window whose first samples are `segment` and the rest silence:
    power mel spectrogram -> dB below its peak -> 0..255, low frequencies in the last row. A silent window
    is all zeros (no division by its zero peak).

    Equal to librosa.feature.melspectrogram (center=True, zero padding) + power_to_db(ref=peak) on the
    zero-padded window, computed faster: the mel filters and the Hann window are built once per config, and
    frames that lie wholly in the padding are set to zero power instead of being transformed."""
    import librosa
    from scipy import fft
    hop, half = cfg.hop_length, cfg.n_fft // 2
    frames = 1 + cfg.window_samples // hop
    segment = segment[:cfg.window_samples]
    loudest = float(np.abs(segment).max()) if len(segment) else 0.0
    if loudest > 1e6:  # a float file can hold any scale: the image is relative to the peak, but such samples'
        segment = segment / loudest  # powers overflow float32 (the clip was rendered black, as silence)
    n = min(frames, -(-(len(segment) + half) // hop))  # frame t covers [t * hop - half, t * hop + half)
    padded = np.zeros((n - 1) * hop + cfg.n_fft, np.float32)
    padded[half:half + len(segment)] = segment[:len(padded) - half]
    windows = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[::hop]  # (n, n_fft)
    stft = fft.rfft(windows * _hann(cfg.n_fft), axis=-1).astype(np.complex64)  # as librosa.stft: float64 FFT
    power = np.zeros((cfg.n_mels, frames), np.float32)
    power[:, :n] = _mel_basis(cfg) @ (np.abs(stft) ** 2).T
    peak = power.max()  # a float32 scalar, as power_to_db(ref=np.max) takes it: the same rounding
    if not peak > POWER_FLOOR:  # silence (or nothing finite): black, rather than 0 dB everywhere
        return np.zeros(power.shape, np.uint8)
    db = librosa.power_to_db(power, ref=peak, amin=POWER_FLOOR, top_db=cfg.top_db)  # in [-top_db, 0]
    img = np.rint((db + cfg.top_db) * (255.0 / cfg.top_db))
    return np.ascontiguousarray(img[::-1].clip(0, 255).astype(np.uint8))


def render_windows(path: str | Path, cfg: MelConfig, *, max_windows: int | None = None) -> list[np.ndarray]:
    """The window images of one clip (all of them, or the first `max_windows`). Raises AudioError."""
    max_seconds = None if max_windows is None else max_windows * cfg.duration
    return [mel_image(w, cfg) for w in split_windows(load_audio(path, cfg, max_seconds=max_seconds), cfg)]


def window_pil(img: np.ndarray):
    """A window image as the 8-bit RGB PIL image the backbones take (what load_image gives for its PNG)."""
    from PIL import Image
    return Image.fromarray(img, "L").convert("RGB")


# ---- folders -> cached PNGs ----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where rendered spectrograms are kept: $ITFITS_CACHE/mel, default ~/.cache/itfits/mel."""
    return Path(os.environ.get("ITFITS_CACHE") or Path.home() / ".cache" / "itfits").expanduser() / "mel"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(os_path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def render_cached(path: str, cfg: MelConfig, folder: Path, max_windows: int | None) -> tuple[list[str], str | None, bool]:
    """(window PNG paths, error, rendered now) for one file. The PNGs of a clip live in one folder,
    folder/<sha256[:2]>/<sha256>.w<max_windows>/000.png ..., written beside it and renamed into place when
    complete: an interrupted render leaves nothing that a later one would use."""
    from PIL import Image
    special = not_a_file(os_path(path))  # before the digest reads it: a FIFO would block forever
    if special:
        return [], special, False
    try:
        digest = _file_digest(path)
    except OSError as e:
        return [], not_found(Path(os_path(path))) if isinstance(e, FileNotFoundError) else f"cannot read: {e}", False
    done = folder / digest[:2] / f"{digest}.w{max_windows or 'all'}"
    pngs = sorted(done.glob("*.png"), key=lambda p: int(p.stem)) if done.is_dir() else []
    if pngs:
        return [str(p) for p in pngs], None, False
    try:
        images = render_windows(path, cfg, max_windows=max_windows)
    except AudioError as e:
        return [], str(e), True
    with atomic_dir(done) as tmp:
        for i, img in enumerate(images):
            Image.fromarray(img, "L").save(tmp / f"{i:03d}.png", format="PNG", compress_level=1)  # speed over size
    return [str(done / f"{i:03d}.png") for i in range(len(images))], None, True


def _render_all(paths: list[str], cfg: MelConfig, folder: Path, max_windows: int | None, workers: int,
                progress: bool) -> list[tuple[list[str], str | None, bool]]:
    # librosa loads its submodules (scipy.signal, numba) lazily, about 3 s: load them once here, before the
    # pool forks, rather than once in every worker
    import librosa.core.audio, librosa.feature.spectral  # noqa: E401, F401
    if workers <= 1 or len(paths) < 4:
        it = (render_cached(p, cfg, folder, max_windows) for p in paths)
        return list(logs.progress(it, total=len(paths), what="rendering clips") if progress else it)
    results: list = [None] * len(paths)
    with ProcessPoolExecutor(max_workers=min(workers, len(paths))) as ex:
        futures = {ex.submit(render_cached, p, cfg, folder, max_windows): i for i, p in enumerate(paths)}
        done = as_completed(futures)
        for fut in (logs.progress(done, total=len(futures), what="rendering clips") if progress else done):
            results[futures[fut]] = fut.result()
    return results


def writable_cache(folder: Path) -> Path:
    """`folder` if spectrograms can be written there, else (a file in its place, no permission, a full disk) a
    temporary folder for this process, removed when it ends, with a warning that says how to keep them."""
    import tempfile
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
        return folder
    except OSError as e:
        problem = e.strerror or str(e)
    import atexit
    import shutil
    try:
        fallback = Path(tempfile.mkdtemp(prefix="itfits-mel-"))
    except OSError as e:
        raise ItfitsError(f"cannot write spectrograms to the mel cache {folder} ({problem}) nor to a temporary folder "
                          f"({e.strerror}); set ITFITS_CACHE to a folder with free space") from e
    atexit.register(shutil.rmtree, fallback, ignore_errors=True)
    warnings.warn(f"the mel cache {folder} cannot be written ({problem}): this run renders to {fallback}, removed "
                  "when it ends; set ITFITS_CACHE to a folder with free space to keep them", ItfitsWarning)
    return fallback


def render_folder(items: pl.DataFrame, cfg: MelConfig, *, cache: Path | None = None, workers: int | None = None,
                  max_windows: int | None = MAX_TRAIN_WINDOWS, progress: bool = True) -> pl.DataFrame:
    """Render the audio files of an items table (path, label, split, error) to cached spectrogram PNGs, in
    parallel over `workers` processes (default: every core), with a progress bar.

    Returns one row per window: path (the PNG), label, split (the clip's: windows of one clip never straddle
    train and valid), error (null), source (the clip), window (0, 1, ...), cached (true if rendered before).
    A clip that cannot be used gets one row instead: path = source, its error, window null."""
    folder = writable_cache((cache or cache_dir()) / cfg.key())
    todo = items.filter(pl.col("error").is_null())["path"].to_list()
    results = dict(zip(todo, _render_all(todo, cfg, folder, max_windows, workers or os.cpu_count() or 1, progress)))
    rows = []
    for path, label, split, error in items.select("path", "label", "split", "error").iter_rows():
        pngs, error, rendered = results.get(path, ([], error, False))
        rows += [(png, label, split, None, path, i, not rendered) for i, png in enumerate(pngs)] or [
            (path, label, split, error and text_path(error), path, None, False)]
    schema = {"path": pl.String, "label": pl.String, "split": pl.String, "error": pl.String, "source": pl.String,
              "window": pl.Int64, "cached": pl.Boolean}
    return pl.DataFrame(rows, schema=schema, orient="row")


def source_files(windows: pl.DataFrame) -> pl.DataFrame:
    """One row per clip of a render_folder table: path (the clip), label, split, error, image (its first window's
    PNG; null for a skipped clip)."""
    return (windows.unique("source", keep="first", maintain_order=True)
            .select(pl.col("source").alias("path"), "label", "split", "error",
                    image=pl.when(pl.col("error").is_null()).then(pl.col("path"))))


def audio_to_images(in_dir: str | Path, out_dir: str | Path, cfg: MelConfig, *, workers: int | None = None,
                    max_windows: int | None = MAX_TRAIN_WINDOWS, cache: Path | None = None, log=print) -> pl.DataFrame:
    """`itfits audio-to-images`: every audio file under in_dir -> out_dir/<same sub-folders>/<name>_<window>.png,
    plus out_dir/windows.csv (image, source, window) and out_dir/skipped.csv (source, error). A cfg without a
    duration gets one from the clips' lengths (`auto_duration`), said with `log`.
    out_dir must be new or empty; it appears complete or not at all. Returns the windows table."""
    import shutil

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise ItfitsError(f"{in_dir} is not a folder")
    if out_dir.resolve().is_relative_to(in_dir.resolve()):  # the next fit IN_DIR would find images beside the audio
        raise ItfitsError(f"OUT_DIR {out_dir} is inside IN_DIR {in_dir}: IN_DIR would then hold images and audio, "
                          "which fit refuses; put OUT_DIR outside it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ItfitsError(f"{out_dir} exists and is not an empty folder; pass a new OUT_DIR (nothing is overwritten)")
    files = [p for p, error in expand_inputs([str(in_dir)], AUDIO_EXTS) if error is None]
    if not files:
        raise ItfitsError(f"no files with extensions {', '.join(sorted(AUDIO_EXTS))} under {in_dir}")
    labels = [text_path(str(Path(p).parent.relative_to(in_dir))) for p in files]
    files, in_dir = [text_path(p) for p in files], Path(text_path(str(in_dir)))  # names that are not UTF-8: \xNN
    items = pl.DataFrame({"path": files, "label": labels,
                          "split": None, "error": None}, schema_overrides={"split": pl.String, "error": pl.String})
    cfg, line = auto_duration(cfg, files)
    if line:
        log(line)
    windows = render_folder(items, cfg, cache=cache, workers=workers, max_windows=max_windows)
    ok = windows.filter(pl.col("error").is_null())
    taken: dict[str, str] = {}  # image stem -> its clip
    rows = []
    with atomic_dir(out_dir) as tmp:
        for png, source, window in ok.select("path", "source", "window").iter_rows():
            rel = Path(source).relative_to(in_dir)
            stem = str(rel.with_suffix(""))
            if taken.setdefault(stem, source) != source:  # a.wav beside a.flac: keep the extension in the name
                stem = str(rel.with_name(rel.name.replace(".", "_")))
            name = f"{stem}_{window:03d}.png"
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, tmp / name)
            rows.append((name, source, window))
        pl.DataFrame(rows, schema={"image": pl.String, "source": pl.String, "window": pl.Int64},
                     orient="row").pipe(write_csv, tmp / "windows.csv")
        write_csv(windows.filter(pl.col("error").is_not_null()).select("source", "error"), tmp / "skipped.csv")
    return windows
