"""The suite's harder sets (issues 26 and 31): classes that are categories drawn by many sources, not one style.

- emoji: 12 categories of Unicode's emoji list (mammals, vehicles, weather, ...), each emoji drawn by four sources
  (Noto Color Emoji, EmojiOne, Symbola's outlines, GNU Unifont's pixels); near: look-alike categories held out
  (birds, sea creatures and bugs, sweets and drinks, aircraft and boats, unhappy faces).
- icon_categories: 12 kinds of desktop icon named by the freedesktop naming spec (folder, battery, mail, ...) from
  10 icon themes; near: user places, media files, printers, zoom.
- icon_categories_noisy: icon_categories with a fifth of its training and validation labels swapped at random.
- speakers: 12 synthetic voices (espeak-ng, flite, festival), each saying 60 random phrases; the class is the voice,
  never the words; near: 4 other espeak-ng voices.

The group of an item (one emoji in all sources, one icon name in all themes) stays in one split, so a test item is an
emoji or icon name never seen in training. bench/suite_sets.py registers these sources and sets beside its own.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

from suite_packages import SR, need_program, unpack

# per class: train + valid, test; near items per class; far items. Smaller than the easy sets: a few dozen a class
HARDER_COUNTS = {"train": 48, "test": 16, "near": 30, "far": 120}
SPEAKER_COUNTS = {"train": 44, "test": 16, "near": 30, "far": 120}


def _on_white(img: Image.Image, size: int, rng, fill=(0.65, 0.95)) -> Image.Image:
    """img, cropped to what it draws, scaled to a random share `fill` of a white square of `size`, placed at random."""
    img = img.convert("RGBA")
    img = img.crop(img.getchannel("A").getbbox() or (0, 0, *img.size))
    scale = rng.uniform(*fill) * size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    out = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    out.alpha_composite(img, (int(rng.integers(0, size - img.width + 1)), int(rng.integers(0, size - img.height + 1))))
    return out.convert("RGB")


# ---- emoji -----------------------------------------------------------------------------------------------------

EMOJI_CATEGORIES = {  # class -> subgroups of emoji-test.txt
    "mammal": ["animal-mammal"], "meal": ["food-prepared", "food-asian"],
    "fruit_vegetable": ["food-fruit", "food-vegetable"], "vehicle": ["transport-ground"],
    "sky_weather": ["sky & weather"], "clothing": ["clothing"], "building": ["place-building", "place-religious"],
    "sport": ["sport", "award-medal"], "tool": ["tool"], "office": ["office", "book-paper", "writing"],
    "music": ["musical-instrument", "music", "sound"],
    "face": ["face-smiling", "face-affection", "face-tongue", "face-hand", "face-neutral-skeptical"],
    # held out as near unknowns: look-alikes of the classes above
    "bird": ["animal-bird"], "sea_bug_reptile": ["animal-marine", "animal-bug", "animal-reptile"],
    "sweet_drink": ["food-sweet", "drink", "dishware"], "aircraft_boat": ["transport-air", "transport-water"],
    "unhappy_face": ["face-concerned", "face-unwell", "face-negative"],
}


def _emoji_by_subgroup(test_file: Path) -> dict[str, list[str]]:
    """Single-code-point emoji of each subgroup (fully qualified; the FE0F presentation selector dropped)."""
    out: dict[str, list[str]] = {}
    subgroup = None
    for line in test_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            cps = [c for c in line.split(";")[0].split() if c != "FE0F"]
            if len(cps) == 1:
                out.setdefault(subgroup, []).append(chr(int(cps[0], 16)))
    return out


def _font_drawer(font_file: Path, px: int, colour: bool):
    """A function char -> RGBA image of the glyph, or None where the font has no glyph for it."""
    from fontTools.ttLib import TTFont
    cmap = set(TTFont(str(font_file), lazy=True).getBestCmap())
    font = ImageFont.truetype(str(font_file), px)

    def draw(char: str):
        if ord(char) not in cmap:
            return None
        img = Image.new("RGBA", (2 * px, 2 * px), (255, 255, 255, 0))
        ImageDraw.Draw(img).text((px // 4, px // 4), char, font=font, embedded_color=colour,
                                 fill=None if colour else (0, 0, 0, 255))
        return img if img.getchannel("A").getbbox() else None
    return draw


def emoji(rng) -> dict:
    root = unpack("emoji")
    fonts = root / "usr/share/fonts"
    unifont = {False: _font_drawer(fonts / "opentype/unifont/unifont.otf", 64, False),
               True: _font_drawer(fonts / "opentype/unifont/unifont_upper.otf", 64, False)}
    pngs = next(root.glob("usr/share/rubygems-integration/all/gems/gemojione-*/assets/png"))
    drawers = [_font_drawer(fonts / "truetype/noto/NotoColorEmoji.ttf", 109, True),  # a bitmap font: 109 px only
               _font_drawer(fonts / "truetype/ancient-scripts/Symbola_hint.ttf", 96, False),
               lambda c: unifont[ord(c) > 0xFFFF](c),
               lambda c: Image.open(f) if (f := pngs / f"{ord(c):04X}.png").exists() else None]
    subgroups = _emoji_by_subgroup(root / "usr/share/unicode/emoji/emoji-test.txt")
    out = {}
    for cls, names in EMOJI_CATEGORIES.items():
        # group: the emoji, drawn by every source that has it
        out[cls] = [(char, _on_white(img, 64, rng)) for name in names for char in subgroups[name]
                    for img in (d(char) for d in drawers) if img is not None]
    return out


# ---- icons by what they show -----------------------------------------------------------------------------------

ICON_CATEGORY_THEMES = ["oxygen/base", "gnome", "mate", "Tango", "nuoveXT2", "Faenza", "elementary-xfce", "Adwaita",
                        "Paper", "Obsidian"]
ICON_CATEGORIES = {  # class -> the freedesktop icon names it takes (a regular expression matched at the start)
    "folder": r"folder", "weather": r"weather-", "battery": r"(gpm-|xfpm-)?battery",
    "wireless": r"(network-wireless|nm-signal|nm-device-wireless|network-cellular)",
    "volume": r"(audio-volume|stock_volume|xfce4-mixer-volume)", "playback": r"media-(playback|skip|seek|record|eject)",
    "mail": r"mail-", "arrow": r"go-", "text_file": r"(text-|x-office-document)",
    "disk": r"(drive-|media-(optical|floppy|flash|removable|tape))", "dialog": r"dialog-", "format": r"format-",
    # held out as near unknowns
    "user": r"user-", "media_file": r"(image-x|video-x|audio-x)", "printer": r"(printer|document-print)",
    "zoom": r"zoom-",
}
ICONS_PER_THEME = 10  # at most this many icons of one theme in a class: a class mixes themes, not one theme's style
ICONS_PER_NAME = 4  # at most this many themes' icons of one name: groups small enough to split train / valid evenly


def icon_categories(rng) -> dict:
    """48x48 icons (Tango 32x32) of 10 themes on white, labelled by the category of their name."""
    root = unpack("icon_categories") / "usr/share/icons"
    out: dict[str, list] = {}
    for theme in ICON_CATEGORY_THEMES:
        files = sorted(f for f in (root / theme).rglob("*.png") if not f.is_symlink()
                       and ({"48x48", "48"} if theme != "Tango" else {"32x32"}) & set(f.relative_to(root).parts))
        for cls, pattern in ICON_CATEGORIES.items():
            mine = [f for f in files if re.match(pattern, f.stem)]
            for i in sorted(rng.permutation(len(mine))[:ICONS_PER_THEME]):
                img = Image.open(mine[i]).convert("RGBA")
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                out.setdefault(cls, []).append((mine[i].stem, Image.alpha_composite(white, img).convert("RGB")))
    for cls, items in out.items():  # group: the icon's name, in any theme; ICONS_PER_NAME of them at random
        kept, seen = [], {}
        for i in rng.permutation(len(items)):
            seen[items[i][0]] = seen.get(items[i][0], 0) + 1
            if seen[items[i][0]] <= ICONS_PER_NAME:
                kept.append(i)
        out[cls] = [items[i] for i in sorted(kept)]
    return out


# ---- speakers --------------------------------------------------------------------------------------------------

# engine, voice; the class name is "engine-voice"
SPEAKERS = [("flite", "awb"), ("flite", "rms"), ("flite", "slt"), ("festival", "kal_diphone"),
            ("festival", "ked_diphone"), ("espeak", "en-us+m1"), ("espeak", "en-gb+f2"),
            ("espeak", "en-gb-scotland+m3"), ("espeak", "en-029+f3"), ("espeak", "en-gb-x-rp+m7"),
            ("espeak", "en-gb-x-gbcwmd+f4"), ("espeak", "en-us+klatt"),
            # held out as near unknowns: other voices of the same engine
            ("espeak", "en-us+m2"), ("espeak", "en-gb+f1"), ("espeak", "en-gb-x-gbclan+m4"), ("espeak", "en-029+m6")]
WORDS = ("apple river window yellow seven morning garden quickly people water music paper happy little orange "
         "mountain table winter summer kitchen doctor pencil forest yesterday tomorrow coffee number purple silver "
         "bridge station animal letter ticket market island rocket button corner dinner engine flower golden hammer "
         "jacket ladder middle napkin pepper rabbit saddle thunder velvet wagon zipper carry finish open close always "
         "never maybe under over between after before simple gentle travel wonder listen remember build begin "
         "answer follow").split()


def _phrases(rng, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, int(rng.integers(2, 5)))) for _ in range(n)]


def _speak(engine: str, voice: str, phrases: list[str], rng, tmp: Path) -> list[Path]:
    """Wave files of `voice` saying each phrase, each at a random speed (and pitch, for espeak-ng)."""
    wavs = [tmp / f"{i}.wav" for i in range(len(phrases))]
    if engine == "festival":  # one process for all: festival takes ~0.5 s to start
        script = [f"(voice_{voice})"] + [
            f"(Parameter.set 'Duration_Stretch {rng.uniform(0.85, 1.2):.2f})"
            f'(utt.save.wave (SynthText "{p}") "{w}" \'riff)' for p, w in zip(phrases, wavs)]
        (tmp / "say.scm").write_text("\n".join(script))
        subprocess.run(["festival", "-b", str(tmp / "say.scm")], check=True, capture_output=True)
    for p, w in zip(phrases, wavs):
        if engine == "flite":
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={rng.uniform(0.85, 1.2):.2f}", "-t", p,
                   "-o", str(w)]
        elif engine == "espeak":
            cmd = ["espeak-ng", "-v", voice, "-s", str(rng.integers(130, 190)), "-p", str(rng.integers(35, 65)),
                   "-w", str(w), p]
        else:
            continue
        subprocess.run(cmd, check=True, capture_output=True)
    return wavs


def speakers(rng, n: int = 60) -> dict:
    """n random phrases of 2-4 words from each voice; every clip band-limited to 8 kHz (flite and festival
    synthesise at 16 kHz, espeak-ng at 22 kHz: the bandwidth alone would tell the engines apart)."""
    import librosa
    need_program("espeak-ng", "espeak-ng")
    need_program("flite", "flite")
    need_program("festival", "festival", "festvox-kallpc16k", "festvox-kdlpc16k")
    out = {}
    for engine, voice in SPEAKERS:
        name = f"{engine}-{voice.replace('_diphone', '').replace('+', '-')}"
        with tempfile.TemporaryDirectory() as tmp:
            phrases = _phrases(rng, n)
            clips = []
            for i, wav in enumerate(_speak(engine, voice, phrases, rng, Path(tmp))):
                y, sr = sf.read(wav, dtype="float32", always_2d=True)
                y = librosa.resample(librosa.resample(y.mean(1), orig_sr=sr, target_sr=16000), orig_sr=16000,
                                     target_sr=SR)
                clips.append((i, 0.9 * y / max(np.abs(y).max(), 1e-6)))  # group: the phrase; peak 0.9, never clipped
        out[name] = clips
    return out


HARDER_SOURCES = {f.__name__: f for f in (emoji, icon_categories, speakers)}
SOURCE_VERSIONS = {"emoji": 1, "icon_categories": 1, "speakers": 1}  # a change rebuilds only that source's set
_voices = [f"{e}-{v.replace('_diphone', '').replace('+', '-')}" for e, v in SPEAKERS]
# set name -> (source, known classes, near classes, far source, far classes or None for all)
HARDER_SETS = {
    "emoji": ("emoji", list(EMOJI_CATEGORIES)[:12], list(EMOJI_CATEGORIES)[12:], "fashion", None),
    "icon_categories": ("icon_categories", list(ICON_CATEGORIES)[:12], list(ICON_CATEGORIES)[12:], "sprites", None),
    "speakers": ("speakers", _voices[:12], _voices[12:], "samples", None),
}
HARDER_SETS["icon_categories_noisy"] = HARDER_SETS["icon_categories"]  # the same items and splits, but:
HARDER_SET_COUNTS = {"emoji": HARDER_COUNTS, "icon_categories": HARDER_COUNTS, "speakers": SPEAKER_COUNTS,
                     # a fifth of the train + valid items filed under another known class at random (test stays clean)
                     "icon_categories_noisy": {**HARDER_COUNTS, "label_noise": 0.2}}
HARDER_AUDIO_SETS = {"speakers"}
