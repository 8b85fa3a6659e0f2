"""Files per second of mel-spectrogram rendering: itfits vs the seed article's recipe, on the same files.

    OMP_NUM_THREADS=1 python bench/audio_render.py [FOLDER ...]   (default: data/audio data/audio_unknown)

recipe     librosa.load -> librosa.feature.melspectrogram -> power_to_db -> librosa.display.specshow in a
           matplotlib figure -> plt.savefig(dpi=400, bbox_inches='tight'), one process
itfits x1  pipelines.audio.render_folder (librosa -> uint8 array -> PNG with PIL), one process
itfits xN  the same over every core (ProcessPoolExecutor), what `itfits fit` runs
Each itfits pass starts from an empty cache, so every file is rendered; imports and the first call of each
method are warmed up before timing. Each method runs REPEATS times, interleaved, and its best time counts
(the machine is shared: the best run is the one least disturbed). Prints a table and the ratios measured
in this one run.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.audio import MelConfig, render_folder  # noqa: E402
from pipelines.sources import AUDIO_EXTS, expand_inputs  # noqa: E402

REPEATS = 3


def recipe(path: str, out: Path) -> None:
    """The seed article's conversion, as written there (figure size 0.72 in at 400 dpi: about 288 x 288 px)."""
    import librosa
    import librosa.display
    import matplotlib.pyplot as plt
    y, sr = librosa.load(path)
    S = librosa.feature.melspectrogram(y=y, sr=sr)
    fig = plt.figure(figsize=[0.72, 0.72])
    ax = fig.add_subplot(111)
    ax.axes.get_xaxis().set_visible(False)
    ax.axes.get_yaxis().set_visible(False)
    ax.set_frame_on(False)
    librosa.display.specshow(librosa.power_to_db(S, ref=np.max))
    plt.savefig(out, dpi=400, bbox_inches="tight", pad_inches=0)
    plt.close("all")


def time_recipe(files: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        recipe(f, out / f"{i}.png")
    return time.perf_counter() - t0


def time_itfits(files: list[str], cfg: MelConfig, workers: int) -> float:
    items = pl.DataFrame({"path": files, "label": "x", "split": "train", "error": None},
                         schema_overrides={"error": pl.String})
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        windows = render_folder(items, cfg, cache=Path(cache), workers=workers, progress=False)
        seconds = time.perf_counter() - t0
    assert windows["error"].null_count() == windows.height and not windows["cached"].any()
    return seconds


def main(folders: list[str]):
    import matplotlib
    matplotlib.use("Agg")
    warnings.simplefilter("ignore")  # the recipe's librosa warns about clips shorter than n_fft
    files = [p for p, _ in expand_inputs(folders, AUDIO_EXTS)]
    cfg = MelConfig(duration=5.0)  # the former default: the timings BENCHMARKS.md records
    cores = os.cpu_count() or 1
    methods = {"recipe (matplotlib, dpi 400), 1 process": lambda out: time_recipe(files, out),
               "itfits, 1 process": lambda out: time_itfits(files, cfg, 1),
               f"itfits, {cores} processes": lambda out: time_itfits(files, cfg, cores)}
    best = {name: float("inf") for name in methods}
    with tempfile.TemporaryDirectory() as out:
        recipe(files[0], Path(out) / "warmup.png")
        time_itfits(files[:1], cfg, 1)
        for _ in range(REPEATS):
            for name, run in methods.items():
                best[name] = min(best[name], run(Path(out)))
    base = best[next(iter(methods))]
    print(f"{len(files)} files from {', '.join(folders)}; MelConfig defaults; best of {REPEATS}; "
          f"load average {os.getloadavg()[0]:.1f} on {cores} cores\n")
    print(f"{'method':42s} {'seconds':>8s} {'files/s':>9s} {'vs recipe':>10s}")
    for name, s in best.items():
        print(f"{name:42s} {s:8.2f} {len(files) / s:9.1f} {base / s:9.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:] or ["data/audio", "data/audio_unknown"])
