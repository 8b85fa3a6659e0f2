"""The data sets of bench/unknown_suite.py, built from packages that install offline (licences: bench/SUITE_DATA.md).

Five image sets and two audio sets, and the harder ones of bench/suite_harder.py (emoji, icon_categories and its
noisy-label twin, speakers: categories drawn by many sources, a few dozen items a class). Each has KNOWN classes
(train / valid / test splits), NEAR held-out classes (look-alikes from the same source) and FAR held-out items
(another source). Items that share a group (one font, one game unit's animation frames, one icon name across
themes, one synthesised voice, one instrument note, one emoji in every source) stay in one split, so a test item
is never a near copy of a training item.

    python bench/suite_sets.py [--sets fashion,digits,...]   # builds what is missing; prints where

Debian packages are fetched with `apt-get download` and unpacked under ~/.cache/itfits-bench (ITFITS_BENCH_CACHE);
espeak-ng, fluidsynth, flite and festival are installed with apt-get when missing. A set is rebuilt only when its
recipe changes (its VERSION, counts or seed; a harder set's source version), so running it again is cheap.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_packages import CACHE, SR, need_program, unpack  # noqa: E402
import suite_harder  # noqa: E402

VERSION = 3
# per class: training + validation items (0.8 / 0.2, as itfits' own split), test items; near items per class; far items
COUNTS = {"train": 120, "test": 40, "near": 40, "far": 160}


# ---- sources: {class: [(group, item)]}; an item is a PIL image or a mono float32 clip at SR ------------------

FASHION = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def fashion(rng) -> dict:
    src = unpack("fashion") / "usr/share/datasets/fashion-mnist"
    images = np.frombuffer(gzip.open(src / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(src / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    out = {}
    for k, name in enumerate(FASHION):
        idx = rng.choice(np.flatnonzero(labels == k), 400, replace=False)
        out[name] = [(int(i), Image.fromarray(images[i])) for i in idx]
    return out


def digits(rng) -> dict:
    from sklearn.datasets import load_digits  # scikit-learn's bundled copy of the UCI handwritten digits (8x8)
    d = load_digits()
    return {str(k): [(int(i), Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC))
                     for i in np.flatnonzero(d.target == k)] for k in range(10)}


def _fonts(root: Path) -> list[Path]:
    """Font files that draw Latin capitals (a font without them draws one .notdef box for every letter)."""
    files = sorted([*root.glob("usr/share/fonts/**/*.ttf"), *root.glob("usr/share/fonts/**/*.otf"),
                    *Path("/usr/share/fonts/truetype/dejavu").glob("*.ttf")])
    good = []
    for f in files:
        try:
            font = ImageFont.truetype(str(f), 40)
            masks = [bytes(font.getmask(c)) for c in "AOX"]
        except OSError:
            continue
        if len(set(masks)) == 3 and all(any(m) for m in masks):
            good.append(f)
    return good


def _glyph(font_file: Path, char: str, rng) -> Image.Image:
    size = 64
    font = ImageFont.truetype(str(font_file), int(rng.integers(30, 46)))
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), char, font=font)
    x = (size - (box[2] - box[0])) / 2 - box[0] + rng.integers(-5, 6)
    y = (size - (box[3] - box[1])) / 2 - box[1] + rng.integers(-5, 6)
    draw.text((x, y), char, font=font, fill=int(rng.integers(0, 80)))
    return img.rotate(float(rng.uniform(-12, 12)), fillcolor=255, resample=Image.BILINEAR)


def glyphs(rng) -> dict:
    fonts = _fonts(unpack("glyphs"))
    chars = "ABCDEFGHPR"
    return {c: [(i // 2, _glyph(fonts[i // 2], c, rng)) for i in range(2 * len(fonts))] for c in chars}


ICON_THEMES = [("oxygen/base", "48x48"), ("gnome", "48x48"), ("mate", "48x48"), ("Tango", "32x32"),
               ("nuoveXT2", "48x48")]


def icons(rng) -> dict:
    root = unpack("icons") / "usr/share/icons"
    out: dict[str, list] = {}
    for theme, size in ICON_THEMES:
        for f in sorted((root / theme / size).glob("*/*.png")):
            if not f.is_symlink():
                out.setdefault(f.parent.name, []).append((f.stem, f))  # group: the icon's name, in any theme
    return out


def sprites(rng) -> dict:
    units = next((unpack("sprites") / "usr/share/games/wesnoth").glob("*/data/core/images/units"))
    # group: the unit ("grunt" of grunt-attack-1.png): its animation frames stay together
    return {race.name: [(f.stem.split("-")[0], f) for f in sorted(race.rglob("*.png"))]
            for race in sorted(units.iterdir()) if race.is_dir()}


SPEECH_ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029"]
SPEECH_VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5", "+croak",
                   "+klatt", "+klatt2", "+whisper"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def speech(rng, n: int = 110) -> dict:
    """Number words spoken by espeak-ng in 7 accents x 17 voice variants, at random speeds and pitches."""
    need_program("espeak-ng", "espeak-ng")
    import librosa
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for word in NUMBER_WORDS:
            out[word] = []
            for i in range(n):
                voice = SPEECH_ACCENTS[i % len(SPEECH_ACCENTS)] + SPEECH_VARIANTS[i // len(SPEECH_ACCENTS) % len(SPEECH_VARIANTS)]
                wav = Path(tmp) / "w.wav"
                subprocess.run(["espeak-ng", "-v", voice, "-s", str(rng.integers(110, 230)), "-p",
                                str(rng.integers(20, 80)), "-w", str(wav), word], check=True, capture_output=True)
                y, sr = sf.read(wav, dtype="float32")
                out[word].append((voice, librosa.resample(y, orig_sr=sr, target_sr=SR)))  # group: the voice
    return out


GM_FAMILIES = {"piano": 0, "organ": 16, "guitar": 24, "bass": 32, "strings": 40, "brass": 56, "reed": 64, "pipe": 72}


def _midi(program: int, notes: list[tuple[int, int]], seconds: float) -> bytes:
    """A one-track MIDI file: `program`, then each (pitch, velocity) held for `seconds` and 0.5 s of silence."""
    def var(n):  # variable-length quantity
        out = [n & 0x7F]
        while n := n >> 7:
            out.insert(0, (n & 0x7F) | 0x80)
        return bytes(out)
    tpq, hold = 480, int(seconds * 960)  # 120 bpm: 960 ticks a second
    ev = b"\x00\xc0" + bytes([program])
    for k, (pitch, vel) in enumerate(notes):  # each event: delta time, then the event
        ev += (var(480) if k else b"\x00") + b"\x90" + bytes([pitch, vel]) + var(hold) + b"\x80" + bytes([pitch, 0])
    ev += var(480) + b"\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, tpq) + b"MTrk" + struct.pack(">I", len(ev)) + ev


def instruments(rng, per_program: int = 16, seconds: float = 1.5) -> dict:
    """Notes of the 8 General MIDI programs of each family, rendered by fluidsynth with FluidR3_GM."""
    need_program("fluidsynth", "fluidsynth")
    sf2 = unpack("instruments") / "usr/share/sounds/sf2/FluidR3_GM.sf2"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, first in GM_FAMILIES.items():
            out[family] = []
            for program in range(first, first + 8):
                notes = [(int(rng.integers(40, 80)), int(rng.integers(60, 120))) for _ in range(per_program)]
                mid, wav = Path(tmp) / "n.mid", Path(tmp) / "n.wav"
                mid.write_bytes(_midi(program, notes, seconds))
                subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.8", "-r", str(SR), "-F", str(wav), str(sf2),
                                str(mid)], check=True, capture_output=True)
                y, _ = sf.read(wav, dtype="float32", always_2d=True)
                y, step = y.mean(1), int(2 * SR)  # each note starts every seconds + 0.5 s
                for j, (pitch, _) in enumerate(notes):
                    out[family].append((f"{program}-{pitch}", y[j * step:j * step + int((seconds + 0.4) * SR)]))
    return out


def samples(rng) -> dict:
    """Sonic Pi's samples by prefix (bd_, drum_, elec_, ambi_, ...), whole: another source of sound."""
    import librosa
    out: dict[str, list] = {}
    for f in sorted((unpack("samples") / "usr/share/sonic-pi/samples").glob("*.flac")):
        y, sr = sf.read(f, dtype="float32", always_2d=True)
        out.setdefault(f.stem.split("_")[0], []).append((f.stem, librosa.resample(y.mean(1)[:4 * sr], orig_sr=sr,
                                                                                  target_sr=SR)))
    return out


SOURCES = {f.__name__: f for f in (fashion, digits, glyphs, icons, sprites, speech, instruments, samples)}

# set name -> (source, known classes, near classes, far source, far classes or None for all)
SETS = {
    "fashion": ("fashion", ["tshirt", "trouser", "dress", "sandal", "bag", "ankle_boot"],
                ["pullover", "coat", "shirt", "sneaker"], "sprites", None),
    "digits": ("digits", list("012345"), list("6789"), "fashion", None),
    "glyphs": ("glyphs", list("ABCDEF"), list("GHPR"), "icons", None),
    "icons": ("icons", ["apps", "devices", "mimetypes", "places", "status"], ["categories", "emblems", "emotes"],
              "digits", None),
    "sprites": ("sprites", ["drakes", "dwarves", "elves-wood", "human-loyalists", "saurians", "undead"],
                ["human-outlaws", "orcs", "merfolk", "nagas"], "glyphs", None),
    "speech": ("speech", NUMBER_WORDS[:6], NUMBER_WORDS[6:], "instruments", None),
    "instruments": ("instruments", ["piano", "organ", "guitar", "bass", "strings"], ["brass", "reed", "pipe"],
                    "samples", None),
}
AUDIO_SETS = {"speech", "instruments"}
SOURCES.update(suite_harder.HARDER_SOURCES)
SETS.update(suite_harder.HARDER_SETS)
AUDIO_SETS |= suite_harder.HARDER_AUDIO_SETS


def counts_of(name: str) -> dict:
    """The set's numbers of items (COUNTS, or fewer for the harder sets)."""
    return suite_harder.HARDER_SET_COUNTS.get(name, COUNTS)


def _split_groups(items: list, rng, shares: tuple[float, ...]) -> list[list]:
    """(group, item) pairs shuffled by group into len(shares) parts of about those shares, no group in two."""
    groups: dict = {}
    for g, item in items:
        groups.setdefault(g, []).append((g, item))
    order = rng.permutation(len(groups))
    keys = list(groups)
    parts, cum, total, edges = [[] for _ in shares], 0, len(items), np.cumsum(shares) / sum(shares)
    for i in order:
        k = int(np.searchsorted(edges, cum / total, side="right"))
        parts[min(k, len(parts) - 1)].extend(groups[keys[i]])
        cum += len(groups[keys[i]])
    return parts


def _write(item, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(item, np.ndarray):
        sf.write(path.with_suffix(".flac"), item, SR, format="FLAC", subtype="PCM_16")
    elif isinstance(item, Path):
        shutil.copyfile(item, path.with_suffix(item.suffix))
    else:
        item.save(path.with_suffix(".png"))


def _take(items: list, n: int, rng) -> list:
    return [items[i] for i in sorted(rng.permutation(len(items))[:n])]


def build(name: str, *, counts: dict | None = None, seed: int = 0, pools: dict | None = None) -> Path:
    """CACHE/sets/NAME with fit/train/ fit/valid/ (the DATA of itfits fit), test/, near/ and far/, each with class
    sub-folders; built unless up to date. `counts`: counts_of(name) unless given."""
    source, known, near, far_source, far_classes = SETS[name]
    counts = counts or counts_of(name)
    out = CACHE / "sets" / name
    recipe = {"version": VERSION, "counts": counts, "seed": seed, "set": SETS[name]}
    if source in suite_harder.SOURCE_VERSIONS:  # the easy sets' recipes stay as they were
        recipe["source_version"] = suite_harder.SOURCE_VERSIONS[source]
    stamp = out / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe)):
        return out
    pools = {} if pools is None else pools
    rng = np.random.default_rng(seed)
    for src in {source, far_source}:
        if src not in pools:
            pools[src] = SOURCES[src](np.random.default_rng(seed))
    shutil.rmtree(out, ignore_errors=True)
    pool = pools[source]
    noise, flips = counts.get("label_noise", 0), np.random.default_rng(seed + 1)  # its own rng: the splits stay
    for cls in known:
        # shares of train+valid vs test, then itfits' own 80/20 on the first part; groups kept whole
        n_fit, n_test = counts["train"], counts["test"]
        fit_part, test_part = _split_groups(pool[cls], rng, (n_fit, n_test))
        train_part, valid_part = _split_groups(fit_part, rng, (0.8, 0.2))
        for split, part, n in (("train", train_part, int(n_fit * 0.8)), ("valid", valid_part, n_fit - int(n_fit * 0.8)),
                               ("test", test_part, n_test)):
            for i, (_, item) in enumerate(_take(part, n, rng)):
                if noise and split != "test" and flips.random() < noise:  # filed under another known class
                    _write(item, out / "fit" / split / flips.choice([c for c in known if c != cls]) / f"{cls}_{i:04d}")
                else:
                    _write(item, out / ("fit" if split != "test" else "") / split / cls / f"{i:04d}")
    for cls in near:
        for i, item in enumerate(_take([x for _, x in pool[cls]], counts["near"], rng)):
            _write(item, out / "near" / cls / f"{i:04d}")
    far_pool = [(c, x) for c, xs in pools[far_source].items() if far_classes is None or c in far_classes for _, x in xs]
    for i, (c, item) in enumerate(_take(far_pool, counts["far"], rng)):
        _write(item, out / "far" / far_source / f"{c}_{i:04d}")
    stamp.write_text(json.dumps(recipe))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default=",".join(SETS))
    args = ap.parse_args()
    pools: dict = {}
    for name in args.sets.split(","):
        out = build(name, pools=pools)
        n = {d.name: sum(1 for _ in d.rglob("*.*")) for d in sorted([*out.glob("fit/*"), *out.glob("[!f]*/"),
                                                                      out / "far"])}
        print(f"{name}: {out} {n}")


if __name__ == "__main__":
    main()
