"""Where the suite's data comes from: Debian packages unpacked (never installed) under ~/.cache/itfits-bench, and the
programs that synthesise audio. Shared by bench/suite_sets.py, its harder sets (bench/suite_harder.py) and
bench/table_sets.py; licences: bench/SUITE_DATA.md."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("ITFITS_BENCH_CACHE", Path.home() / ".cache" / "itfits-bench"))
ROOT = CACHE / "root"  # Debian packages unpacked here (dpkg -x), never installed
# the harder sets' packages, apart: the glyphs set draws every font under ROOT, so emoji fonts there would change it
HARDER_ROOT = CACHE / "root-harder"
SR = 22050
PACKAGES = {
    "fashion": ["dataset-fashion-mnist"],
    "glyphs": ["fonts-noto-core", "fonts-urw-base35", "fonts-liberation", "fonts-freefont-ttf", "fonts-dejavu-core"],
    "icons": ["oxygen-icon-theme", "gnome-icon-theme", "mate-icon-theme", "tango-icon-theme", "lxde-icon-theme"],
    "sprites": ["wesnoth-1.16-data"],
    "instruments": ["fluid-soundfont-gm"],
    "samples": ["sonic-pi-samples"],
    "penguins_raw": ["r-cran-palmerpenguins"],  # the tables of bench/table_sets.py
    "mlbench": ["r-cran-mlbench"],
}
HARDER_PACKAGES = {  # unpacked into HARDER_ROOT
    "emoji": ["fonts-noto-color-emoji", "ruby-gemojione", "fonts-symbola", "fonts-unifont", "unicode-data"],
    "icon_categories": ["oxygen-icon-theme", "gnome-icon-theme", "mate-icon-theme", "tango-icon-theme",
                        "lxde-icon-theme", "faenza-icon-theme", "elementary-xfce-icon-theme", "adwaita-icon-theme",
                        "paper-icon-theme", "obsidian-icon-theme"],
}


def unpack(source: str) -> Path:
    """ROOT (HARDER_ROOT for a harder set), with the Debian packages of `source` unpacked into it (downloaded once,
    kept in CACHE/debs)."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    root = HARDER_ROOT if source in HARDER_PACKAGES else ROOT
    for pkg in {**PACKAGES, **HARDER_PACKAGES}.get(source, []):
        marker = root / ".unpacked" / pkg
        if marker.exists():
            continue
        if not list(debs.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=debs, check=True, capture_output=True)
        subprocess.run(["dpkg", "-x", str(next(debs.glob(f"{pkg}_*.deb"))), str(root)], check=True)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return root


def need_program(name: str, *packages: str) -> None:
    if shutil.which(name) is None:
        subprocess.run(["apt-get", "install", "-y", "-q", *packages], check=True, capture_output=True)
