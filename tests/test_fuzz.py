"""Fuzz suite (marker `fuzz`; `make test` runs it): bad inputs of every class issue 20 names, generated afresh from a
seed (ITFITS_FUZZ_SEED, default 0), through fit, predict and serve. Every case must end in a prediction, an error row
or one `error:` line: no traceback (an exception other than ItfitsError fails the test), no HTTP 500, nothing hanging
and no temporary file left. The number of cases is printed at the end of the run (conftest)."""
from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import socket
import tempfile
import wave
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from helpers import FASHION_TEST, REPO, itfits_here, leftovers, png_claiming

pytestmark = pytest.mark.fuzz
SEED = int(os.environ.get("ITFITS_FUZZ_SEED", "0"))
COUNT = {"cases": 0}  # read by conftest's terminal summary
GOOD_PNG = sorted(FASHION_TEST.glob("*/*.png"))[0]
PENGUINS = REPO / "data" / "penguins.csv"


def counted(n: int = 1) -> None:
    COUNT["cases"] += n


def clean_exit(ran, *, where: Path) -> None:
    """Exit 0, or 1 with one `error:` line (warnings aside); no traceback; no temporary file under `where`."""
    assert "Traceback" not in ran.err, ran.err[-3000:]
    assert ran.code in (0, 1), f"exit {ran.code}: {ran.err[-2000:]}"
    if ran.code == 1:
        lines = [ln for ln in ran.err.strip().splitlines() if not ln.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith("error: "), ran.err[-2000:]
    assert not leftovers(where), leftovers(where)


# ---- bad image files ------------------------------------------------------------------------------------------------

def bad_images(folder: Path, rng: random.Random) -> dict[str, Path]:
    """name -> a file (or something else) the image pipeline must survive; randomised cuts and bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    noise = Image.fromarray(np.random.default_rng(rng.randrange(10**6)).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    png, jpg = io.BytesIO(), io.BytesIO()
    noise.save(png, "PNG")
    noise.save(jpg, "JPEG")
    png, jpg = png.getvalue(), jpg.getvalue()
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = folder / name
        out[name].write_bytes(data)
    put("zero.png", b"")
    for i in range(3):
        put(f"random{i}.png", rng.randbytes(rng.randrange(1, 5000)))
        put(f"cut{i}.png", png[:rng.randrange(8, len(png) - 1)])
        put(f"cut{i}.jpg", jpg[:rng.randrange(4, len(jpg) - 1)])
        flipped = bytearray(png)
        for _ in range(20):
            flipped[rng.randrange(33, len(png))] ^= 1 << rng.randrange(8)
        put(f"bitflip{i}.png", bytes(flipped))
    put("text.png", b"just text\n")
    put("bomb.png", png_claiming(100_000, 100_000))
    put("png_header_only.png", png[:8])
    for name, img in [("one_pixel.png", Image.new("RGB", (1, 1))), ("strip.png", Image.new("L", (4000, 1))),
                      ("cmyk.jpg", Image.new("CMYK", (20, 20))), ("la.png", Image.new("LA", (20, 20))),
                      ("i16.png", Image.new("I;16", (20, 20))), ("float.tiff", Image.new("F", (20, 20)))]:
        img.save(folder / name)
        out[name] = folder / name
    os.mkfifo(folder / "fifo.png")
    out["fifo.png"] = folder / "fifo.png"
    (folder / "folder.png").mkdir()
    out["folder.png"] = folder / "folder.png"
    os.symlink(folder / "nowhere.png", folder / "broken_link.png")
    out["broken_link.png"] = folder / "broken_link.png"
    os.symlink("/dev/zero", folder / "device.png")
    out["device.png"] = folder / "device.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket.png"))
    sock.close()
    out["socket.png"] = folder / "socket.png"
    for name in ("=HYPERLINK(1+1).png", "-2+3.png", "@SUM(A1).png", "new\nline.png", "x" * 200 + ".png"):
        shutil.copy(GOOD_PNG, folder / name)
        out[name] = folder / name
    raw = os.fsencode(folder) + b"/caf\xe9.png"  # a name that is not UTF-8
    shutil.copy(GOOD_PNG, raw)
    out["not_utf8.png"] = Path(os.fsdecode(raw))
    return out


def test_predict_survives_every_bad_image(trained_run, tmp_path, capsys):
    files = bad_images(tmp_path / "in", random.Random(SEED))
    os.symlink("..", tmp_path / "in" / "loop")  # a folder link loop for the pattern below
    patterns = [str(tmp_path / "in" / "**" / "*.png"), str(tmp_path / "none" / "*.png")]
    ran = itfits_here(capsys, "predict", trained_run.model, *map(str, files.values()), *patterns,
                      "--out", tmp_path / "p.csv", "--workers", "0")
    clean_exit(ran, where=tmp_path)
    assert ran.code == 0
    rows = pl.read_csv(tmp_path / "p.csv", infer_schema=False)
    n_glob = len([p for p in (tmp_path / "in").iterdir() if p.suffix == ".png" and not p.is_dir()])
    assert rows.height == len(files) + n_glob + 1, "one row per file given, per file the pattern matches, per empty pattern"
    assert rows.filter(pl.col("error").is_null() & pl.col("label").is_null()).height == 0  # a label or an error
    assert not any(str(p).startswith(("=", "+", "-", "@")) for p in rows["path"])
    counted(len(files) + len(patterns))


def test_fit_skips_every_bad_image_with_a_reason(tmp_path):
    from pipelines.sources import check_image, read_source, text_path
    files = bad_images(tmp_path / "a", random.Random(SEED + 1))
    for c in ("a", "b"):
        (tmp_path / c).mkdir(exist_ok=True)
        for i in range(2):
            shutil.copy(GOOD_PNG, tmp_path / c / f"good{i}.png")
    items = read_source(tmp_path, check=check_image)
    errors = dict(items.select("path", "error").iter_rows())
    usable = {"one_pixel.png", "strip.png", "cmyk.jpg", "la.png", "i16.png", "float.tiff"}
    for name, path in files.items():
        if name.startswith("bitflip") or path.is_dir():  # a flipped bit may leave a decodable image; folders are no files
            continue
        key = text_path(str(path.resolve() if path.exists() else path.absolute()))
        assert key in errors, f"{name} was not listed"
        good = name in usable or name.startswith(("=", "-", "@", "new", "x", "not_utf8"))
        assert (errors[key] is None) == good, f"{name}: {errors[key]}"
    counted(len(files))


# ---- bad audio files --------------------------------------------------------------------------------------------------

def bad_audio(folder: Path, rng: random.Random) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    clip = sorted((REPO / "data" / "audio").rglob("*.flac"))[0].read_bytes()
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = folder / name
        out[name].write_bytes(data)
    put("zero.wav", b"")
    for ext in (".wav", ".mp3", ".flac", ".ogg", ".aiff"):
        put(f"random{ext}", rng.randbytes(rng.randrange(1, 20000)))
    for i in range(3):
        put(f"cut{i}.flac", clip[:rng.randrange(4, len(clip) - 1)])
    put("text.wav", b"RIFF but not really\n")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:  # a valid header with no samples
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
    put("no_samples.wav", buf.getvalue())
    os.mkfifo(folder / "fifo.wav")
    out["fifo.wav"] = folder / "fifo.wav"
    (folder / "folder.wav").mkdir()
    out["folder.wav"] = folder / "folder.wav"
    return out


def test_audio_rendering_gives_every_bad_clip_a_reason(tmp_path):
    from pipelines.audio import MelConfig, render_folder
    files = bad_audio(tmp_path / "in", random.Random(SEED))
    paths = [str(p) for p in files.values() if not p.is_dir()]
    items = pl.DataFrame({"path": paths, "label": "x", "split": None, "error": None},
                         schema_overrides={"split": pl.String, "error": pl.String})
    windows = render_folder(items, MelConfig(duration=1.0), cache=tmp_path / "cache", workers=1, progress=False)
    assert windows.filter(pl.col("error").is_null()).height == 0
    assert all(windows["error"].str.len_chars() > 0)
    assert not leftovers(tmp_path)
    counted(len(paths))


def test_fit_on_audio_classes_of_bad_clips_fails_cleanly(tmp_path, capsys):
    for c in ("a", "b"):
        bad_audio(tmp_path / "data" / c, random.Random(SEED + ord(c)))
        shutil.rmtree(tmp_path / "data" / c / "folder.wav")
    ran = itfits_here(capsys, "fit", tmp_path / "data", "--out", tmp_path / "run", "--lr", "1e-3", "--workers", "1")
    clean_exit(ran, where=tmp_path)
    assert ran.code == 1 and not (tmp_path / "run").exists()
    counted()


# ---- bad tables -------------------------------------------------------------------------------------------------------

def bad_tables(folder: Path, rng: random.Random) -> dict[str, Path]:
    """name -> a CSV or Parquet variant of data/penguins.csv with one kind of damage."""
    folder.mkdir(parents=True, exist_ok=True)
    text = PENGUINS.read_text()
    lines = text.splitlines()
    df = pl.read_csv(PENGUINS)
    out = {}

    def put(name: str, data: bytes | str) -> None:
        out[name] = folder / name
        out[name].write_bytes(data.encode() if isinstance(data, str) else data)

    def row_edit(name: str, edit) -> None:
        copy = list(lines)
        i = rng.randrange(1, len(copy))
        copy[i] = edit(copy[i])
        put(name, "\n".join(copy) + "\n")
    row_edit("short_row.csv", lambda r: ",".join(r.split(",")[:rng.randrange(1, 7)]))
    row_edit("long_row.csv", lambda r: r + ",extra")
    row_edit("quote_open.csv", lambda r: r + ',"unclosed')
    row_edit("nul_bytes.csv", lambda r: r.replace(",", ",\0", 1))
    put("not_utf8.csv", text.replace("Adelie", "Ad\udce9lie", 3).encode("utf-8", "surrogateescape"))
    put("empty.csv", "")
    put("header_only.csv", lines[0] + "\n")
    put("random.csv", rng.randbytes(3000))
    put("semicolons.csv", text.replace(",", ";"))
    put("duplicate_header.csv", text.replace("island", "species", 1))
    put("bom.csv", "\ufeff" + text)
    put("crlf.csv", text.replace("\n", "\r\n"))
    put("one_class.csv", df.with_columns(species=pl.lit("Adelie")).write_csv())
    put("target_all_missing.csv", df.with_columns(species=pl.lit(None, pl.String)).write_csv())
    put("inf_values.csv", df.with_columns(bill_length_mm=pl.lit(float("inf"))).write_csv())
    put("huge_values.csv", df.with_columns(bill_length_mm=pl.lit(1e308)).write_csv())
    put("formula_cells.csv", df.with_columns(island=pl.lit("=cmd|' /C calc'!A0")).write_csv())
    df.with_columns(tags=pl.lit([1, 2]), info=pl.struct(a=pl.col("year"))).write_parquet(folder / "nested.parquet")
    out["nested.parquet"] = folder / "nested.parquet"
    put("truncated.parquet", (lambda b: b[:len(b) // 2])(_parquet_bytes(df)))
    put("utf16.csv", text.encode(rng.choice(["utf-16", "utf-16-le", "utf-16-be"])))
    put("utf32.csv", text.encode("utf-32"))
    put("latin1.csv", text.replace("Dream", rng.choice(["Dr\u00e9am", "Dr\u00eaam", "Dr\u00e6m"])).encode(
        rng.choice(["latin-1", "cp1252"])))
    blank = list(lines)
    for _ in range(rng.randrange(1, 6)):  # blank lines and lines of commas only: not rows
        blank.insert(rng.randrange(1, len(blank) + 1), rng.choice(["", "\r", "," * lines[0].count(",")]))
    put("blank_lines.csv", "\n".join(blank) + "\n" * rng.randrange(1, 4))
    os.mkfifo(folder / "fifo.csv")
    out["fifo.csv"] = folder / "fifo.csv"
    return out


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def test_tabular_fit_survives_every_bad_table(tmp_path, capsys):
    tables = bad_tables(tmp_path / "in", random.Random(SEED))
    for name, path in tables.items():
        run = tmp_path / f"run_{name}"
        ran = itfits_here(capsys, "fit", path, "--target", "species", "--out", run, "--epochs", "1", "--lr", "1e-2")
        clean_exit(ran, where=tmp_path)
        assert (run / "model").is_dir() if ran.code == 0 else not run.exists(), name
    counted(len(tables))


def test_tabular_predict_survives_every_bad_table(table_run, tmp_path, capsys):
    tables = bad_tables(tmp_path / "in", random.Random(SEED + 1))
    for name, path in tables.items():
        for ext in (".csv", ".parquet"):
            out = tmp_path / f"p_{name}{ext}"
            clean_exit(itfits_here(capsys, "predict", table_run / "model", path, "--out", out), where=tmp_path)
    counted(2 * len(tables))


def test_path_label_tables_with_bad_cells_fail_or_skip_cleanly(tmp_path, capsys):
    rng = random.Random(SEED)
    (tmp_path / "img").mkdir()
    os.mkfifo(tmp_path / "img" / "fifo.png")
    cells = ["", " ", "img/missing.png", "img/fifo.png", "img", "/dev/zero", "../../etc/passwd", "NA", "\u00e9.png"]
    n = 0
    for i in range(12):
        rows = [f"{rng.choice(cells)},{rng.choice(['a', 'b', '', ' ', 'NA'])}" for _ in range(6)]
        (tmp_path / f"t{i}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        ran = itfits_here(capsys, "fit", tmp_path / f"t{i}.csv", "--out", tmp_path / f"run{i}", "--lr", "1e-3",
                          "--workers", "0")
        clean_exit(ran, where=tmp_path)
        assert ran.code == 1 and not (tmp_path / f"run{i}").exists()  # no table here has 2 usable files per class
        n += 1
    counted(n)


# ---- lying audio headers (issue 29) -------------------------------------------------------------------------------

def lying_wavs(folder: Path, rng: random.Random) -> list[Path]:
    """WAVs whose header fields disagree with their bytes: sample rates of a few Hz, sizes that say more or less than
    is there, channel counts and bit depths that make no sense."""
    import struct
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(14):
        n = rng.randrange(100, 30_000)
        data = rng.randbytes(2 * n)
        rate = rng.choice([1, 2, 7, 50, 400, 8000, 4_000_000_000])
        channels, bits = rng.choice([(1, 16), (2, 16), (0, 16), (1, 0), (1, 13), (65535, 16)])
        size = rng.choice([len(data), 0, 0xFFFFFFFF, len(data) * 1000])
        header = (b"RIFF" + struct.pack("<I", min(36 + size, 0xFFFFFFFF)) + b"WAVEfmt "
                  + struct.pack("<IHHIIHH", 16, 1, channels, rate, min(rate * 2, 0xFFFFFFFF), 2, bits) + b"data"
                  + struct.pack("<I", size))
        out.append(folder / f"lying{i}.wav")
        out[-1].write_bytes(header + data)
    return out


def test_audio_with_lying_headers_is_refused_or_bounded(tmp_path):
    from pipelines.audio import MAX_DURATION, AudioError, MelConfig, load_audio
    cfg = MelConfig(duration=1.0)
    clips = lying_wavs(tmp_path, random.Random(SEED))
    for clip in clips:
        try:
            y = load_audio(clip, cfg)
        except AudioError:
            continue
        assert len(y) <= MAX_DURATION * cfg.sample_rate and len(y) <= 4096 * clip.stat().st_size, clip
    counted(len(clips))


# ---- concurrent writers and full disks (issue 29) -------------------------------------------------------------------

def test_sweep_keeps_every_live_writer_and_removes_every_dead_one(tmp_path):
    import subprocess
    import sys
    from pipelines.io import sweep_temps
    rng = random.Random(SEED)
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    owners = {"live": os.getpid(), "parent": os.getppid(), "dead": ended.pid}
    made = {}
    for i in range(20):
        kind = rng.choice(list(owners) + ["older"])
        pid = owners.get(kind)
        name = f".p.csv.{pid}.{rng.randbytes(4).hex()}.tmp" if pid else f".p.csv.{rng.randbytes(4).hex()}.tmp"
        path = tmp_path / name
        path.mkdir() if rng.random() < 0.3 else path.write_bytes(b"x")
        made[path] = kind
    sweep_temps(tmp_path / "p.csv")
    for path, kind in made.items():
        assert path.exists() == (kind in ("live", "parent")), (path.name, kind)
    counted(len(made))


FULL_WRITERS = """
import json, random, sys
import polars as pl
from pipelines.errors import ItfitsError
from pipelines.io import atomic_dir, write_json, write_table
rng = random.Random(int(sys.argv[2]))
folder = sys.argv[1]
big = pl.DataFrame({"path": [f"=f{i}.png" for i in range(3000)], "score": [i / 7 for i in range(3000)]})
writers = [lambda p: write_table(big, p + ".csv"), lambda p: write_table(big, p + ".parquet"),
           lambda p: write_json({"x": "y" * 100_000}, p + ".json")]
def folder_of_files(p):
    with atomic_dir(p) as tmp:
        for i in range(20):
            (tmp / f"{i}.bin").write_bytes(b"0" * 20_000)
writers.append(folder_of_files)
for i in range(int(sys.argv[3])):
    try:
        rng.choice(writers)(f"{folder}/out{i}")
        print("written")
    except ItfitsError as e:
        print("refused", "cannot write" in str(e) and "ulimit" in str(e))
"""


def test_every_writer_on_a_full_disk_is_refused_cleanly(tmp_path):
    import resource
    import signal
    import subprocess
    import sys

    def limited():  # a write past the limit fails with EFBIG (SIGXFSZ ignored), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
    n = 12
    proc = subprocess.run([sys.executable, "-c", FULL_WRITERS, str(tmp_path), str(SEED), str(n)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, preexec_fn=limited)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    said = proc.stdout.split("\n")[:-1]
    assert len(said) == n and set(said) <= {"written", "refused True"} and "refused True" in said, proc.stdout
    assert not leftovers(tmp_path)  # no temporary file; what was written is whole (a small Parquet fits)
    counted(n)


# ---- tampered bundles -------------------------------------------------------------------------------------------------

ODD_VALUES = [None, -1, 0, 1e300, float("nan"), float("inf"), "explode", [], {}, True, [0.5] * 7]


def _leaves(meta, prefix=()):
    if isinstance(meta, dict):
        for k, v in meta.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(meta, list) and meta and not isinstance(meta[0], str):
        for i, v in enumerate(meta):
            yield from _leaves(v, prefix + (i,))
    if prefix:
        yield prefix


def test_predict_survives_tampered_bundles(trained_run, tmp_path, capsys):
    rng = random.Random(SEED)
    meta = json.loads((trained_run.model / "itfits.json").read_text())
    keys = [k for k in _leaves(meta) if k[0] != "versions"]
    cases = [(k, v) for k in keys for v in ODD_VALUES]
    cases = rng.sample(cases, min(30, len(cases)))
    weights = (trained_run.model / "model.safetensors").read_bytes()
    raw_cases = [("itfits.json", b"{not json"), ("itfits.json", b"[1, 2]"), ("itfits.json", b"\xff\xfe"),
                 ("model.safetensors", weights[:len(weights) // 3]), ("model.safetensors", b""),
                 ("model.safetensors", rng.randbytes(1000))]
    for i, case in enumerate(cases + raw_cases):
        bundle = tmp_path / f"b{i}"
        shutil.copytree(trained_run.model, bundle)
        if case in raw_cases:
            (bundle / case[0]).write_bytes(case[1])
        else:
            keys, value = case
            tampered = json.loads((bundle / "itfits.json").read_text())
            target = tampered
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
            (bundle / "itfits.json").write_text(json.dumps(tampered))
        out = tmp_path / f"p{i}.csv"
        ran = itfits_here(capsys, "predict", bundle, GOOD_PNG, "--out", out, "--workers", "0")
        clean_exit(ran, where=tmp_path)
        if ran.code == 0:  # a change that does not matter (a training figure, say): a real prediction
            row = pl.read_csv(out).row(0, named=True)
            assert row["error"] is None and math.isfinite(row["confidence"]), (case, row)
        shutil.rmtree(bundle)
    counted(len(cases) + len(raw_cases))


# ---- uploads to serve ---------------------------------------------------------------------------------------------------

def _upload_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("itfits-upload-*")}


def test_serve_survives_bad_uploads(trained_run, table_run, tmp_path):
    from starlette.testclient import TestClient
    from app.web import create_app
    rng = random.Random(SEED)
    images = bad_images(tmp_path / "img", rng)
    tables = bad_tables(tmp_path / "tab", rng)
    before = _upload_dirs()
    n = 0
    with TestClient(create_app(trained_run.run, max_files=50, max_file_mb=0.5), base_url="http://localhost") as client:
        uploads = [(name, p.read_bytes()) for name, p in images.items() if p.is_file() and not p.is_symlink()
                   and not name.startswith("not_utf8")]
        uploads += [("../../etc/evil.png", GOOD_PNG.read_bytes()), ("no_extension", b"x"), (".hidden.png", b""),
                    ("big.png", rng.randbytes(600_000)), ("caf\u00e9 \u2603.png", GOOD_PNG.read_bytes())]
        for name, data in uploads:
            resp = client.post("/predict", files=[("files", (name, data, "image/png"))])
            assert resp.status_code in (200, 400, 413), (name, resp.status_code)
            n += 1
        for body, ctype in [(b"garbage", "multipart/form-data; boundary=zz"), (b"x=1", "application/x-www-form-urlencoded"),
                            (rng.randbytes(500), "multipart/form-data; boundary=--"), (b"", "text/plain")]:
            resp = client.post("/predict", content=body, headers={"content-type": ctype})
            assert resp.status_code in (200, 400, 413), (ctype, resp.status_code)
            n += 1
    with TestClient(create_app(table_run), base_url="http://localhost") as client:
        for name, path in tables.items():
            if path.is_file():
                resp = client.post("/predict", files=[("files", (name, path.read_bytes(), "text/csv"))])
                assert resp.status_code == 200, (name, resp.status_code)
                n += 1
    assert _upload_dirs() <= before, "an upload folder was left in the temp folder"
    assert not leftovers(tmp_path)
    counted(n)


def test_malformed_bundle_json_and_tensors_are_clear_errors(table_run, tmp_path):
    """Issue 29: JSON nested deep at a random key, values of a random wrong type, keys removed, and statistics
    tensors of a random dtype or with NaN: load_bundle gives an ItfitsError or a bundle, never another exception."""
    import torch
    from safetensors.torch import load_file, save_file
    from pipelines.bundle import load_bundle
    from pipelines.errors import ItfitsError
    rng = random.Random(SEED)
    meta = json.loads((table_run / "model" / "itfits.json").read_text())
    tensors = load_file(str(table_run / "model" / "model.safetensors"))
    keys = [k for k in _leaves(meta) if k[0] != "versions"]
    n = 0
    for i in range(40):
        bundle = tmp_path / f"b{i}"
        shutil.copytree(table_run / "model", bundle)
        tampered = json.loads(json.dumps(meta))
        keys_ = rng.choice(keys)
        target = tampered
        for k in keys_[:-1]:
            target = target[k]
        kind = rng.choice(["deep", "odd", "delete", "tensor"])
        if kind == "deep":
            depth = rng.choice([50, 900, 5000, 100_000])
            target[keys_[-1]] = json.loads("[" * min(depth, 900) + "]" * min(depth, 900))
            text = json.dumps(tampered) if depth <= 900 else json.dumps(tampered).replace(
                '"classes"', '"deep": ' + "[" * depth + "]" * depth + ', "classes"', 1)
        elif kind == "odd":
            target[keys_[-1]] = rng.choice(ODD_VALUES + [{"kind": []}, "\u0000", 2**80])
            text = json.dumps(tampered)
        elif kind == "delete" and isinstance(target, dict):
            del target[keys_[-1]]
            text = json.dumps(tampered)
        else:
            text = json.dumps(meta)
            name = rng.choice(sorted(tensors))
            changed = dict(tensors)
            changed[name] = rng.choice([lambda t: t.double(), lambda t: t.bfloat16(), lambda t: t.long(),
                                        lambda t: t.clone().fill_(float("nan")),
                                        lambda t: t.clone().fill_(float("-inf"))])(tensors[name].float())
            save_file({k: v.contiguous() for k, v in changed.items()}, str(bundle / "model.safetensors"))
        (bundle / "itfits.json").write_text(text)
        try:
            load_bundle(bundle)
        except ItfitsError:
            pass
        n += 1
        shutil.rmtree(bundle)
    counted(n)
