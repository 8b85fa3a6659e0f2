"""Helpers shared by the tests: the CLI as a user runs it, and makers of odd and broken image files."""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "data" / "fashion"
FASHION_TEST = REPO / "data" / "fashion_test"
CLASSES = ["bag", "sneaker", "trouser", "tshirt"]

# Small and quick, yet clearly better than chance (0.25) on 4 classes; --lr given, so no lr_find.
FIT_ARGS = ["--epochs", "2", "--freeze-epochs", "1", "--size", "48", "--lr", "3e-3", "--bs", "16", "--workers", "0"]


def run_cli(*args, cwd: Path = REPO, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`itfits ARGS...` in a fresh interpreter; returns the finished process (stdout, stderr, returncode)."""
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- odd and broken files -------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit gray pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# file name -> a word its skip reason must contain
BROKEN = {"zero_bytes.png": "empty", "truncated.png": "truncated", "truncated.jpg": "truncated",
          "text_named.jpg": "not an image", "bomb.png": "bomb", "bomb_warn.png": "bomb"}


def write_broken_files(folder: Path) -> dict[str, Path]:
    """Files that must be skipped (the names in BROKEN), written into `folder`; {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    png, jpg = _encoded(noise, "PNG"), _encoded(noise, "JPEG", quality=90)
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "text_named.jpg").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))  # 1e10 pixels: PIL refuses outright
    (folder / "bomb_warn.png").write_bytes(png_claiming(10_000, 10_000))  # 1e8: over the limit, under 2x
    return {name: folder / name for name in BROKEN}


def write_odd_images(folder: Path) -> dict[str, Path]:
    """Valid images in the modes that break naive loaders; {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    out["gray"] = folder / "gray.png"
    Image.new("L", (40, 30), 128).save(out["gray"])

    # palette with transparency: index 1 (left half) is transparent, index 0 is red
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 20, 30))
    out["palette"] = folder / "palette.png"
    pal.save(out["palette"], transparency=1)

    # RGBA: left half opaque red, right half fully transparent (black underneath the alpha)
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)
    out["rgba"] = folder / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(out["rgba"])

    # 16-bit gray ramp up to 65535
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    out["gray16"] = folder / "gray16.png"
    Image.fromarray(ramp).save(out["gray16"])

    # JPEG stored 40 wide x 30 high with EXIF orientation 6 (rotate 90 degrees clockwise to display)
    exif_img = Image.new("RGB", (40, 30), (0, 200, 0))
    exif = exif_img.getexif()
    exif[0x0112] = 6
    out["exif"] = folder / "exif_rot.jpg"
    exif_img.save(out["exif"], exif=exif, quality=95)
    return out


def free_port() -> int:
    """A localhost TCP port nothing listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_glyphs(folder: Path, n: int = 40) -> Path:
    """`n` letters rendered in the DejaVu fonts that Debian machines carry (fonts-dejavu-core): real images of
    another domain than the sample photos, for unknowns far from every class."""
    from PIL import ImageDraw, ImageFont
    fonts = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("*.ttf"))
    assert fonts, "fonts-dejavu-core is not installed"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("L", (48, 48), 255)
        ImageDraw.Draw(img).text((10, 4), "ABCDEFGHJK"[i % 10], font=ImageFont.truetype(str(fonts[i % len(fonts)]), 36),
                                 fill=0)
        img.save(folder / f"glyph{i:02d}.png")
    return folder


@dataclass(frozen=True)
class Ran:
    code: int  # exit status
    out: str
    err: str

    # the names of subprocess.CompletedProcess, so a test reads either the same way
    returncode = property(lambda self: self.code)
    stdout = property(lambda self: self.out)
    stderr = property(lambda self: self.err)


def run_here(*args) -> Ran:
    """`itfits ARGS` in this process through app.cli.main, as the console script runs it, without the seconds a
    fresh interpreter takes (run_cli keeps one subprocess test per command). An exception main does not turn into
    one `error:` line propagates: a traceback fails the test. Warnings go to pytest's record, not into `err`."""
    import contextlib
    import signal
    from unittest import mock
    from app.cli import main
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with mock.patch.object(sys, "argv", ["itfits", *map(str, args)]), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return Ran(code, out.getvalue(), err.getvalue())


def itfits_here(capsys, *args) -> Ran:
    """run_here, called as the fuzz and hardening tests do (their capsys is not needed)."""
    return run_here(*args)


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files of atomic writes (.NAME.*.tmp) anywhere under `folders`."""
    return [p for f in folders if Path(f).exists() for p in Path(f).rglob(".*.tmp")]
