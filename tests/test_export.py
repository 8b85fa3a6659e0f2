"""itfits export (ONNX, TorchScript) and itfits predict on the exported ONNX file, on the real sample data: the
file's outputs against the bundle's, its metadata, the predictions table through onnxruntime against the bundle's,
an audio model, and the errors a user can cause."""
from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from helpers import FASHION_TEST, REPO, run_here
from pipelines.bundle import load_bundle
from pipelines.export import CHECK_TOLERANCE, INSTALL_HINT, META_KEY, STATS_KEY, compare_outputs, load_exported

FASHION_UNKNOWN = REPO / "data" / "fashion_unknown"
AUDIO, AUDIO_UNKNOWN = REPO / "data" / "audio", REPO / "data" / "audio_unknown"


@pytest.fixture(scope="module")
def onnx_file(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    ran = run_here("export", trained_run.model, "--format", "onnx", "--out", out, "--check", FASHION_TEST)
    assert ran.code == 0, ran.err[-3000:]
    assert "within the tolerance" in ran.out and "labels differ on 0, unknown flags on 0" in ran.out, ran.out
    return out


def _files(*folders: Path) -> list[str]:
    return sorted(str(p) for f in folders for p in f.rglob("*") if p.is_file())


def _assert_close(check: dict):
    """compare_outputs' figures within export's stated tolerance, and no label or unknown flag changed."""
    assert check["logits"] <= CHECK_TOLERANCE["logits"], check
    assert check["probabilities"] <= CHECK_TOLERANCE["probabilities"], check
    assert check["score"] <= CHECK_TOLERANCE["score_relative"] * max(1.0, check["score_scale"]), check
    assert check["labels_differ"] == 0 and check["unknown_differ"] == 0 and check["within_tolerance"], check


def test_onnx_outputs_match_the_bundle_on_real_files(trained_run, onnx_file):
    bundle, exported = load_bundle(trained_run.model), load_exported(onnx_file)
    check = compare_outputs(bundle, exported, _files(FASHION_TEST, FASHION_UNKNOWN))
    assert check["files"] == len(_files(FASHION_TEST, FASHION_UNKNOWN))
    _assert_close(check)
    assert check["score_scale"] > 1, "the default score (pretrained_mahalanobis) is in the hundreds: a real check"


def test_onnx_metadata_holds_preprocessing_calibration_and_statistics(trained_run, onnx_file):
    import onnx
    from safetensors.torch import load
    props = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    meta = json.loads((trained_run.model / "itfits.json").read_text())
    assert json.loads(props["calibration"]) == meta["calibration"]
    assert json.loads(props["preprocessing"]) == meta["preprocessing"] and json.loads(props["classes"]) == meta["classes"]
    inner = json.loads(props[META_KEY])
    assert inner["calibration"]["score"] == "pretrained_mahalanobis" and inner["exported"]["format"] == "onnx"
    stats = load(base64.b64decode(props[STATS_KEY]))
    bundle = load_bundle(trained_run.model)
    np.testing.assert_array_equal(stats["unknown.ref_precision"].numpy(), bundle.calibration.stats.ref_precision)
    graph = onnx.load(str(onnx_file)).graph
    assert [o.name for o in graph.output] == ["logits", "features"] and graph.input[0].name == "image"
    assert graph.output[1].type.tensor_type.shape.dim[1].dim_value == bundle.calibration.stats.n_features


def test_predict_takes_the_onnx_file_and_gives_the_same_table(trained_run, onnx_file, tmp_path):
    inputs = [FASHION_TEST, FASHION_UNKNOWN, trained_run.broken["truncated.png"]]
    tables = {}
    # the ONNX file runs fp32; the bundle's auto precision is its training's, bf16 where fit's CPU probe chose it
    for name, model, extra in (("bundle", trained_run.model, ["--precision", "fp32"]), ("onnx", onnx_file, [])):
        ran = run_here("predict", model, *inputs, "--out", tmp_path / f"{name}.csv", "--workers", "0", *extra)
        assert ran.code == 0, ran.err[-3000:]
        tables[name] = pl.read_csv(tmp_path / f"{name}.csv")
    a, b = tables["bundle"], tables["onnx"]
    assert a.columns == b.columns and a.height == b.height == len(_files(FASHION_TEST, FASHION_UNKNOWN)) + 1
    for col in ("path", "label", "unknown", "error", "top1", "top2", "top3"):
        assert a[col].to_list() == b[col].to_list(), col
    assert a["unknown"].sum() > 0 and (~a["unknown"].fill_null(True)).sum() > 0, "both kinds of rows are compared"
    ok = a["error"].is_null()
    assert (a["score"] - b["score"]).filter(ok).abs().max() <= CHECK_TOLERANCE["score_relative"] * a["score"].abs().max()
    assert (a["confidence"] - b["confidence"]).filter(ok).abs().max() <= CHECK_TOLERANCE["probabilities"]


def test_predict_with_onnx_refuses_another_precision(onnx_file, tmp_path):
    ran = run_here("predict", onnx_file, FASHION_TEST, "--out", tmp_path / "p.csv", "--precision", "bf16")
    assert ran.code == 1 and "leave --precision out" in ran.err and "Traceback" not in ran.err


def test_torchscript_export_matches_and_carries_the_metadata(trained_run, tmp_path):
    out = tmp_path / "model.pt"
    ran = run_here("export", trained_run.model, "--format", "torchscript", "--out", out)
    assert ran.code == 0, ran.err[-3000:]
    extra = {META_KEY: "", STATS_KEY: "", "calibration": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads((trained_run.model / "itfits.json").read_text())
    assert json.loads(extra["calibration"]) == meta["calibration"] and extra[STATS_KEY]
    _assert_close(compare_outputs(load_bundle(trained_run.model), load_exported(out, fmt="torchscript"),
                                  _files(FASHION_TEST)))
    x = torch.zeros(3, 3, meta["preprocessing"]["size"], meta["preprocessing"]["size"])
    logits, features = module(x)
    assert logits.shape == (3, len(meta["classes"])) and features.shape[0] == 3


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory) -> Path:
    """A quick audio bundle (one epoch) on the sample clips."""
    run = tmp_path_factory.mktemp("audio_export") / "run"
    ran = run_here("fit", AUDIO, "--out", run, "--epochs", "1", "--freeze-epochs", "0", "--size", "48", "--lr", "3e-3",
                   "--workers", "0", "--duration", "1")
    assert ran.code == 0, ran.err[-3000:]
    return run / "model"


def test_audio_model_exports_and_predicts_through_onnx(audio_model, tmp_path):
    """The ONNX model takes the mel window image; predict renders each clip as usual and averages its windows."""
    out = tmp_path / "audio.onnx"
    ran = run_here("export", audio_model, "--format", "onnx", "--out", out)
    assert ran.code == 0, ran.err[-3000:]
    _assert_close(compare_outputs(load_bundle(audio_model), load_exported(out), _files(AUDIO_UNKNOWN, AUDIO / "kick")))
    tables = []
    for model in (audio_model, out):
        ran = run_here("predict", model, AUDIO_UNKNOWN, "--out", tmp_path / "p.csv", "--workers", "0")
        assert ran.code == 0, ran.err[-3000:]
        tables.append(pl.read_csv(tmp_path / "p.csv"))
    assert tables[0].height == len(_files(AUDIO_UNKNOWN))
    assert tables[0].select("path", "label", "unknown").equals(tables[1].select("path", "label", "unknown"))


def test_export_errors_are_one_line_with_the_way_out(trained_run, table_run, onnx_file, tmp_path, monkeypatch):
    cases = [
        (("export", table_run / "model", "--format", "onnx", "--out", tmp_path / "t.onnx"), "tabular model"),
        (("export", trained_run.model, "--format", "onnx", "--out", tmp_path / "m.pt"), "must end in .onnx"),
        (("export", trained_run.model, "--format", "tflite", "--out", tmp_path / "m.tflite"), "onnx, torchscript"),
        (("predict", tmp_path / "missing.onnx", FASHION_TEST, "--out", tmp_path / "p.csv"), "is not a file"),
    ]
    (tmp_path / "model.pt").write_bytes(b"not a model")
    cases.append((("predict", tmp_path / "model.pt", FASHION_TEST, "--out", tmp_path / "p.csv"), "bundle folder"))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_file.read_bytes()[:5000])
    cases.append((("predict", broken, FASHION_TEST, "--out", tmp_path / "p.csv"), "cannot be loaded as an ONNX"))
    for args, words in cases:
        ran = run_here(*args)
        assert ran.code == 1 and words in ran.err and ran.err.count("\n") == 1, (args, ran.err)
    assert not (tmp_path / "t.onnx").exists() and not (tmp_path / "p.csv").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as where the extra is not installed
    ran = run_here("predict", onnx_file, FASHION_TEST, "--out", tmp_path / "p.csv")
    assert ran.code == 1 and INSTALL_HINT in ran.err and ran.err.count("\n") == 1, ran.err


def test_an_onnx_file_not_from_itfits_is_refused(onnx_file, tmp_path):
    """An ONNX file without itfits' metadata: refused in one line, not run with made-up classes."""
    import onnx
    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    ran = run_here("predict", tmp_path / "bare.onnx", FASHION_TEST, "--out", tmp_path / "p.csv")
    assert ran.code == 1 and "not a valid itfits bundle" in ran.err, ran.err
    shutil.rmtree(tmp_path, ignore_errors=True)
