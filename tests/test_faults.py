"""Faults of a second hardening round (issue 29): concurrent writers, full disks and unusable folders, inputs that
lie about their size, odd tables, malformed bundles, hostile names. Each gives one clear `error:` line, an error row
or a note, and loses nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from helpers import FASHION_TEST, REPO, leftovers, run_here

TEST_PNG = sorted(FASHION_TEST.glob("*/*.png"))[0]


def error_line(ran) -> str:
    assert ran.code == 1, f"exit {ran.code}; stdout {ran.out[-500:]} stderr {ran.err[-500:]}"
    lines = [ln for ln in ran.err.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), ran.err
    return lines[0]


# ---- 1: concurrent writers -----------------------------------------------------------------------------------

def test_sweep_removes_only_temp_files_whose_owner_is_gone(tmp_path):
    from pipelines.io import sweep_temps, temp_prefix
    out = tmp_path / "p.csv"
    live = tmp_path / f"{temp_prefix(out)}abc.tmp"  # this process's: alive
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    dead = tmp_path / f".p.csv.{ended.pid}.abc.tmp"
    older = tmp_path / ".p.csv.abc123.tmp"  # an older itfits's name, without a PID
    for p in (live, dead, older):
        p.write_bytes(b"")
    assert sweep_temps(out) == 2 and live.exists() and not dead.exists() and not older.exists()


# a predict's writer in another process: write_predictions streams rows into its temporary file until told to end
SLOW_WRITER = """
import sys, polars as pl
from pipelines.predict import write_predictions
def rows():
    for i in range(3):
        yield pl.DataFrame({"path": [f"slow{i}.png"], "label": ["bag"], "unknown": [False], "error": [None]}, schema_overrides={"error": pl.String})
        if i == 0:
            print("writing", flush=True)
            sys.stdin.readline()
write_predictions(rows(), sys.argv[1])
"""


def test_two_predicts_writing_one_out_both_finish_and_the_last_wins(trained_run, tmp_path):
    out = tmp_path / "p.csv"
    first = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline() == "writing\n", first.stderr.read()
    second = run_here("predict", trained_run.model, TEST_PNG, "--out", out)  # its start-up sweep meets a live file
    assert second.code == 0 and pl.read_csv(out).height == 1, second.err
    _, err = first.communicate("go\n", timeout=60)
    assert first.returncode == 0, err[-2000:]
    assert pl.read_csv(out)["path"].to_list() == ["slow0.png", "slow1.png", "slow2.png"]  # whole: the last writer's
    assert not leftovers(tmp_path)


# ---- 2: full disks and unusable folders -----------------------------------------------------------------------

FULL_DISK = """
import sys, torch
from pipelines.errors import ItfitsError
from pipelines.io import atomic_path
try:  # a checkpoint, as fit's Checkpoint callback writes it
    with atomic_path(sys.argv[1]) as tmp:
        torch.save({"w": torch.zeros(1 << 16)}, tmp)
except ItfitsError as e:
    print("checkpoint:", e)
from app.cli import main
sys.argv = ["itfits", "predict", *sys.argv[2:]]
main()
"""


def _file_size_limit(limit: int):
    import resource
    import signal

    def limited():  # a write past the limit fails with EFBIG (SIGXFSZ ignored), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limited


def test_a_full_disk_is_one_error_line_and_leaves_nothing_half_written(table_run, tmp_path):
    out = tmp_path / "p.csv"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "last.pt"), str(table_run / "model"),
                           str(PENGUINS), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(20_000))
    assert proc.stdout.startswith("checkpoint: cannot write") and "size limit" in proc.stdout, proc.stdout
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert lines == [lines[0]] and lines[0].startswith(f"error: cannot write {out}") and "ulimit" in lines[0]
    assert not out.exists() and not (tmp_path / "last.pt").exists() and not leftovers(tmp_path)


def test_long_out_names_and_fit_into_the_current_folder(table_run, tmp_path, monkeypatch):
    out = tmp_path / ("p" * 246 + ".csv")  # 250 bytes: its temporary file's name must still be legal
    assert run_here("predict", table_run / "model", PENGUINS, "--out", out).code == 0 and out.is_file()
    line = error_line(run_here("predict", table_run / "model", PENGUINS, "--out", tmp_path / ("p" * 300 + ".csv")))
    assert "300" not in line and "304 bytes" in line and "shorter name" in line
    monkeypatch.chdir(tmp_path)  # not empty: it holds the predictions
    line = error_line(run_here("fit", PENGUINS, "--target", "species", "--model", "gbdt", "--out", "."))
    assert "current folder" in line and "--out runs/NAME" in line


def test_an_unusable_mel_cache_falls_back_to_a_temporary_folder_with_a_warning(tmp_path):
    from pipelines.audio import writable_cache
    from pipelines.errors import ItfitsWarning
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder goes")
    with pytest.warns(ItfitsWarning, match="mel cache .* cannot be written .*ITFITS_CACHE"):
        folder = writable_cache(blocked / "mel")  # render_folder's first step
    assert folder.is_dir() and not folder.is_relative_to(tmp_path)
    (folder / "000.png").write_bytes(b"x")
    assert writable_cache(tmp_path / "ok") == tmp_path / "ok"  # a usable one is used as it is


# ---- 3: inputs bounded by what they are, not what they claim ---------------------------------------------------

def _wav(path: Path, *, rate: int, samples: int) -> Path:
    """A 16-bit mono WAV of `samples` samples whose header says `rate` Hz."""
    import struct
    import numpy as np
    data = np.random.default_rng(0).integers(-3000, 3000, samples).astype("<i2").tobytes()
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
                     + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(data))
                     + data)
    return path


def test_audio_is_bounded_by_its_header_and_size_before_decoding(tmp_path, monkeypatch):
    from pipelines import audio
    from pipelines.audio import AudioError, MelConfig, load_audio, set_max_duration
    cfg = MelConfig(duration=1.0)
    monkeypatch.setattr(audio, "_max_duration", [audio.MAX_DURATION])  # the setter's state, put back after the test
    lying = _wav(tmp_path / "1hz.wav", rate=1, samples=22_050)  # 44 KB whose header says 6.1 hours
    with pytest.raises(AudioError, match="22,050 s by its header.*--max-duration 7200"):
        load_audio(lying, cfg)
    set_max_duration(86_400)  # under the cap, yet more samples than 44 KB can give
    with pytest.raises(AudioError, match="more than a file of 44,.* bytes can hold"):
        load_audio(lying, cfg)
    clip = _wav(tmp_path / "3s.wav", rate=8000, samples=24_000)
    assert load_audio(clip, cfg).shape == (66_150,)  # 3 s at 22,050 Hz
    set_max_duration(2)
    with pytest.raises(AudioError, match="lasts 3 s .*over --max-duration 2 s; cut it, or raise --max-duration"):
        load_audio(clip, cfg)
    line = error_line(run_here("predict", tmp_path, clip, "--out", tmp_path / "p.csv", "--max-duration", "0"))
    assert "--max-duration must be" in line


# ---- 4: tables -----------------------------------------------------------------------------------------------

PENGUINS = REPO / "data" / "penguins.csv"


def test_blank_lines_are_not_rows_and_a_row_without_values_is_an_error_row(table_run, tmp_path):
    lines = PENGUINS.read_text().splitlines()
    header, rows = lines[0], lines[1:4]
    n_cols = header.count(",") + 1
    table = tmp_path / "t.csv"
    table.write_text("\n".join([header, rows[0], "", rows[1], "\r", "," * (n_cols - 1), rows[2],
                                "Adelie" + "," * (n_cols - 2) + ",2007", "", ""]) + "\n")  # only the target and year
    out = tmp_path / "p.csv"
    assert run_here("predict", table_run / "model", table, "--out", out).code == 0
    p = pl.read_csv(out)
    assert p.height == 4, p  # the three rows and the one without a feature; no blank line
    assert p["error"].null_count() == 3 and p["label"].null_count() == 1
    assert "missing" in p["error"][3] and p["label"][3] is None


@pytest.mark.parametrize("encoding,words", [("utf-16", "UTF-16"), ("latin-1", "0xe9")])
def test_a_csv_not_in_utf8_is_refused_naming_its_encoding(table_run, tmp_path, encoding, words):
    table = tmp_path / "t.csv"
    table.write_bytes(PENGUINS.read_text().replace("Biscoe", "Bisc\u00e9", 1).encode(encoding))
    line = error_line(run_here("predict", table_run / "model", table, "--out", tmp_path / "p.csv"))
    assert "not UTF-8" in line and words in line and "iconv" in line, line


# ---- 5: bundles ------------------------------------------------------------------------------------------------

def _retyped(model: Path, dest: Path, change) -> Path:
    """A copy of the bundle `model` whose safetensors tensors went through `change(key, tensor)`."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(model, dest)
    tensors = load_file(str(model / "model.safetensors"))
    save_file({k: change(k, v).contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    return dest


@pytest.mark.parametrize("kind,change,words", [
    ("fp16", lambda k, v: v.half() if v.is_floating_point() else v, "float16, where the model needs float32"),
    ("int64", lambda k, v: v.long(), "int64, where the model needs float32"),
    ("bf16 stats", lambda k, v: v.bfloat16() if k.startswith("unknown.") else v, "unknown."),
    ("nan", lambda k, v: v.clone().fill_(float("nan")) if v.is_floating_point() and v.ndim == 4 else v, "NaN"),
    ("inf in reference", lambda k, v: v.clone().fill_(float("inf")) if k.startswith("reference.") and
     v.is_floating_point() else v, "reference."),
])
def test_bundle_tensors_of_the_wrong_dtype_or_not_finite_are_refused(trained_run, tmp_path, kind, change, words):
    from pipelines.bundle import load_bundle
    from pipelines.errors import ItfitsError
    bundle = _retyped(trained_run.model, tmp_path / "b", change)
    with pytest.raises(ItfitsError, match="not a valid itfits bundle") as e:
        load_bundle(bundle)
    assert words in str(e.value), e.value


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"format_version": 1, "classes": ' + "[" * 50_000 + "]" * 50_000 + "}",
                                  "model.kind: []"])
def test_malformed_bundle_json_is_a_clear_error(table_run, tmp_path, text):
    import json
    import shutil
    bundle = tmp_path / "b"
    shutil.copytree(table_run / "model", bundle)
    if text == "model.kind: []":
        meta = json.loads((bundle / "itfits.json").read_text())
        text = json.dumps({**meta, "model": {**meta["model"], "kind": []}})
    (bundle / "itfits.json").write_text(text)
    assert "not a valid itfits bundle" in error_line(run_here("predict", bundle, PENGUINS, "--out", tmp_path / "p.csv"))


# ---- 7: names --------------------------------------------------------------------------------------------------

FORMULA = "=cmd|' -C calc'!A0"


def _penguins_with(tmp_path: Path, *, renamed: dict) -> Path:
    table = tmp_path / "penguins.csv"
    pl.read_csv(PENGUINS).with_columns(pl.col("species").replace(renamed)).write_csv(table)
    return table


def test_formulas_are_escaped_in_every_csv_of_a_run_folder(tmp_path):
    from pipelines.io import FORMULA_STARTS
    from pipelines.run import FitConfig, fit
    table = _penguins_with(tmp_path, renamed={"Adelie": FORMULA, "Gentoo": "+SUM(A1)", "Chinstrap": "@x"})
    run = tmp_path / "run"
    fit(FitConfig(data=str(table), target="species", ignore=["year"], model="gbdt", out=str(run)), log=lambda *a: None)
    written = sorted(run.rglob("*.csv"))
    assert {"per_class.csv", "confusion_matrix.csv", "top_losses.csv"} <= {p.name for p in written}, written
    for csv in written:
        df = pl.read_csv(csv, infer_schema_length=0)
        cells = [c for col in df.columns for c in df[col].drop_nulls().to_list()] + df.columns
        live = [c for c in cells if c.startswith(FORMULA_STARTS) and not _is_number(c)]
        assert not live, (csv.name, live[:5])
    assert f"'{FORMULA}" in (run / "confusion_matrix.csv").read_text()  # escaped, not dropped


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_hidden_folders_inside_a_class_are_left_out_of_fit_and_predict(tmp_path):
    from PIL import Image
    from pipelines.sources import expand_inputs, read_source
    for c in ("a", "b"):
        for i in range(2):
            (tmp_path / "data" / c / ".thumbs").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
            Image.new("RGB", (4, 4)).save(tmp_path / "data" / c / ".thumbs" / f"{i}.png")
    items = read_source(tmp_path / "data")
    assert items.height == 4 and not items["path"].str.contains(".thumbs", literal=True).any(), items
    assert len(expand_inputs([str(tmp_path / "data")])) == 4


def test_a_class_named_unknown_is_refused_with_the_way_out(tmp_path):
    from pipelines.errors import ItfitsError
    from pipelines.run import FitConfig, fit
    from pipelines.sources import read_source, require_classes
    for c in ("unknown", "cat"):
        for i in range(3):
            (tmp_path / "data" / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / c / f"{i}.png").write_bytes(TEST_PNG.read_bytes())
    with pytest.raises(ItfitsError, match="named 'unknown'.*rename the class"):
        require_classes(read_source(tmp_path / "data"))
    table = _penguins_with(tmp_path, renamed={"Chinstrap": "unknown"})
    with pytest.raises(ItfitsError, match="named 'unknown'.*rename the class"):
        fit(FitConfig(data=str(table), target="species", model="gbdt", out=str(tmp_path / "run")), log=lambda *a: None)


@pytest.mark.parametrize("why", ["time limit", "stopping"])
def test_an_upload_past_the_time_limit_answers_with_the_rest_not_predicted(trained_run, monkeypatch, why):
    import threading
    from starlette.testclient import TestClient
    from app.web import create_app, server
    if why == "time limit":
        monkeypatch.setattr(server, "REQUEST_S", 0.0)  # the limit passed after the first file
    else:
        monkeypatch.setattr(server, "STOPPING", threading.Event())
        server.STOPPING.set()  # SIGTERM came: the file begun is finished, the others are not begun
    files = sorted(FASHION_TEST.glob("*/*.png"))[:3]
    with TestClient(create_app(trained_run.run), base_url="http://localhost") as client:  # a Host it answers
        page = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files]).text
    assert page.count("not predicted: the upload passed the server") == 2, page[-3000:]


def test_pixels_decoded_at_once_are_bounded_across_threads(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image, ImageOps
    from pipelines import images, sources
    paths = []
    for i in range(16):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8 + i, 8), (i, 0, 0)).save(paths[-1])
    monkeypatch.setattr(sources, "DECODE_PIXELS", 250)  # room for two or three of these at once, never all 16
    seen, transpose = [], ImageOps.exif_transpose
    monkeypatch.setattr(images.ImageOps, "exif_transpose", lambda im: (seen.append(sources._in_flight[0]),
                                                                       time.sleep(0.01), transpose(im))[-1])
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(big)  # 1,600 pixels, over the budget: decoded alone, not refused
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(images.load_image, paths + [str(big)]))
    assert [im.size[0] for im in loaded] == [8 + i for i in range(16)] + [40]
    assert max(seen) <= 250 and sources._in_flight[0] == 0, seen
