"""Rebuild data/audio* from Debian's sonic-pi-samples (every file taken is CC0 in its debian/copyright).

    apt-get download sonic-pi-samples && dpkg -x sonic-pi-samples_*.deb /tmp/spi
    python data/make_audio_sample.py /tmp/spi

Writes mono 22.05 kHz 16-bit FLAC clips, cut to at most 4 s (with a 50 ms fade-out where cut):
audio/ (four known classes) and audio_unknown/ (held-out classes, for unknown detection).
"""
import re
import sys
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

SR, MAX_SECONDS, FADE_SECONDS = 22050, 4.0, 0.05
KNOWN = {  # classes a spectrogram tells apart: a thump, a hiss, a tone, a drum with pitch
    "kick": ["bd_808", "bd_ada", "bd_boom", "bd_fat", "bd_gas", "bd_haus", "bd_klub", "bd_pure", "bd_sone", "bd_tek",
             "bd_zome", "bd_zum", "drum_heavy_kick", "drum_bass_hard", "drum_bass_soft", "elec_soft_kick",
             "elec_hollow_kick"],
    "cymbal": ["drum_cymbal_closed", "drum_cymbal_hard", "drum_cymbal_open", "drum_cymbal_pedal", "drum_cymbal_soft",
               "drum_splash_hard", "drum_splash_soft", "elec_cymbal"],
    "bass": ["bass_dnb_f", "bass_drop_c", "bass_hard_c", "bass_hit_c", "bass_thick_c", "bass_trance_c", "bass_voxy_c",
             "bass_voxy_hit_c", "bass_woodsy_c"],
    "tabla": ["tabla_dhec", "tabla_ghe1", "tabla_ghe2", "tabla_ghe3", "tabla_ghe4", "tabla_ghe5", "tabla_ghe6",
              "tabla_ghe7", "tabla_ghe8", "tabla_ke1", "tabla_ke2", "tabla_ke3", "tabla_na", "tabla_na_o", "tabla_na_s",
              "tabla_re", "tabla_tas1", "tabla_tas2", "tabla_tas3", "tabla_te1", "tabla_te2", "tabla_te_m",
              "tabla_te_ne", "tabla_tun1", "tabla_tun2", "tabla_tun3"],
}
HELD_OUT = {  # none of the classes above: for unknown detection
    "ambient": ["ambi_choir", "ambi_piano", "ambi_swoosh"],
    "guitar": ["guit_harmonics", "guit_e_slide"],
    "snare": ["sn_dub", "elec_snare"],
    "vinyl": ["vinyl_scratch", "vinyl_backspin"],
}


def licences(copyright_file: Path) -> dict[str, str]:
    """sample name -> licence, from the per-file stanzas of a debian/copyright file."""
    out = {}
    for stanza in copyright_file.read_text().split("\n\n"):
        files = re.search(r"^Files:\s*(.*?)\n\S", stanza, re.S | re.M)
        lic = re.search(r"^License:\s*(\S+)", stanza, re.M)
        if files and lic:
            for f in files.group(1).split():
                out[Path(f).stem] = lic.group(1)
    return out


def convert(src: Path, dst: Path):
    y, sr = sf.read(src, dtype="float32", always_2d=True)
    y = librosa.resample(y.mean(axis=1), orig_sr=sr, target_sr=SR)
    n = int(MAX_SECONDS * SR)
    if len(y) > n:
        y = y[:n]
        fade = int(FADE_SECONDS * SR)
        y[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dst, y, SR, format="FLAC", subtype="PCM_16")


def main(root: str):
    root, here = Path(root), Path(__file__).parent
    samples = next(root.rglob("bd_808.flac")).parent
    lic = licences(next(root.rglob("sonic-pi-samples/copyright")))
    for out, classes in (("audio", KNOWN), ("audio_unknown", HELD_OUT)):
        for label, names in classes.items():
            for name in names:
                assert lic.get(name) == "CC0", f"{name}: licence {lic.get(name)}, not CC0"
                convert(samples / f"{name}.flac", here / out / label / f"{name}.flac")


if __name__ == "__main__":
    main(sys.argv[1])
