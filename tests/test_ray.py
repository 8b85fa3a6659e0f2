"""`itfits predict --engine ray` on a real local Ray cluster: the same rows as the local engine (images, audio clips,
a table), bad files as error rows, a cluster joined by --address, and the one-line error without the extra.

Every cluster binds to 127.0.0.1 and is shut down at the end: the in-process one by ray.shutdown, the `ray start`
one by ending the process group this module started (never `ray stop`, which ends every Ray on the machine)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from helpers import FASHION_TEST, REPO, run_cli, run_here, write_broken_files
from pipelines.bundle import load_bundle
from pipelines.predict import PredictConfig, predict
from pipelines.ray_engine import predict_on_ray

AUDIO, AUDIO_UNKNOWN = REPO / "data" / "audio", REPO / "data" / "audio_unknown"
PENGUINS = REPO / "data" / "penguins.csv"
# Ray's usage statistics would leave the machine; a one-machine cluster listens on 127.0.0.1 alone (without the
# second switch Ray swaps 127.0.0.1 for the machine's network address and listens on every interface)
LOCAL_ONLY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ENV = {**os.environ, **LOCAL_ONLY}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs in this process, on 127.0.0.1; shut down after the module."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in LOCAL_ONLY.items():  # before Ray is imported: it reads them then
            mp.setenv(k, v)
        import ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Broken images (empty, truncated, text named .jpg, decompression bombs)."""
    return write_broken_files(tmp_path_factory.mktemp("ray_broken"))


def local_rows(model: Path, inputs: list[str], **config) -> pl.DataFrame:
    rows = list(predict(load_bundle(model), inputs, PredictConfig(**config)))
    return (pl.concat(rows, how="diagonal_relaxed") if isinstance(rows[0], pl.DataFrame)
            else pl.DataFrame(rows, infer_schema_length=None))


def assert_same_rows(local: pl.DataFrame, ray: pl.DataFrame, key: str = "path") -> None:
    """Same rows (in any order): the same labels, flags, errors and top-k classes; numbers within fp tolerance."""
    assert ray.height == local.height and set(ray.columns) >= set(local.columns) - {c for c in local.columns
                                                                                    if c not in ray.columns and c.endswith("_input")}
    local, ray = local.sort(key), ray.sort(key)
    assert ray[key].to_list() == local[key].to_list()
    for c in [c for c in local.columns if c in ("label", "unknown", "error") or (c.startswith("top") and not c.endswith("_prob"))]:
        assert ray[c].to_list() == local[c].to_list(), f"column {c} differs between the engines"
    for c in [c for c in local.columns if c in ("confidence", "score") or c.endswith("_prob")]:
        a, b = local[c].to_numpy().astype(float), ray[c].to_numpy().astype(float)
        # a Mahalanobis score is a difference of terms thousands large: its rounding scales with the largest score
        scale = max(1.0, float(np.nanmax(np.abs(a)))) if (~np.isnan(a)).any() else 1.0
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale,
                                                                          equal_nan=True), c


def test_images_with_bad_files_give_the_local_rows(ray_cluster, trained_run, bad_files, tmp_path):
    inputs = [str(FASHION_TEST), *map(str, bad_files.values()), str(tmp_path / "missing.png")]
    out = tmp_path / "preds"
    counts = predict_on_ray(trained_run.model, inputs, out, PredictConfig(batch_size=16))
    ray = pl.read_parquet(out / "*.parquet")
    local = local_rows(trained_run.model, inputs, batch_size=16)
    assert_same_rows(local, ray)
    assert ray.columns == local.columns, "the predictions table's columns, in its order"
    assert counts == {"files": local.height, "unknown": int(local["unknown"].fill_null(False).sum()),
                      "errors": len(bad_files) + 1}
    errors = dict(ray.filter(pl.col("error").is_not_null()).select("path", "error").iter_rows())
    assert set(errors) == {*map(str, bad_files.values()), str(tmp_path / "missing.png")}
    assert len(list(out.glob("*.parquet"))) >= 1 and not list(tmp_path.glob(".*.tmp")), "no temporaries left"


def test_cli_writes_one_parquet_file_and_a_table_of_paths(ray_cluster, trained_run, bad_files, tmp_path):
    """--out FILE.parquet: one file; a CSV of paths (relative to its folder, one empty cell) as the input."""
    images = tmp_path / "images"
    for p in sorted(FASHION_TEST.rglob("*.png"))[:10]:
        (images / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, images / p.parent.name / p.name)
    listed = sorted(str(p.relative_to(tmp_path)) for p in images.rglob("*.png"))
    table = tmp_path / "paths.csv"
    paths = listed + ["", str(bad_files["truncated.png"])]  # a second column: else an empty cell is a blank line
    pl.DataFrame({"path": paths, "note": ["x"] * len(paths)}).write_csv(table)
    out = tmp_path / "p.parquet"
    proc = run_here("predict", trained_run.model, table, "--out", out, "--engine", "ray", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 rows, " in proc.stdout and "2 errors" in proc.stdout and out.is_file()
    ray = pl.read_parquet(out)
    assert ray.height == 12 and ray.filter(pl.col("path") == "")["error"].to_list() == ["empty path cell"]
    local = local_rows(trained_run.model, [str(tmp_path / p) for p in listed] + [str(bad_files["truncated.png"])])
    assert_same_rows(local, ray.filter(pl.col("path") != ""))
    assert not list(tmp_path.glob(".*.tmp")), "no temporaries left"


def test_a_table_gives_the_local_rows(ray_cluster, table_run, tmp_path):
    """data/penguins.csv with bad values in a few rows: the same predictions and row errors as the local engine."""
    rows = pl.read_csv(PENGUINS).with_columns(pl.col("bill_length_mm").cast(pl.String), row=pl.int_range(pl.len()))
    rows = rows.with_columns(bill_length_mm=pl.when(pl.col("row") == 3).then(pl.lit("abc"))
                             .when(pl.col("row") == 5).then(pl.lit("NA")).otherwise(pl.col("bill_length_mm")))
    csv = tmp_path / "rows.csv"
    rows.write_csv(csv)
    out = tmp_path / "table_preds"
    counts = predict_on_ray(table_run / "model", [str(csv)], out)
    ray = pl.read_parquet(out / "*.parquet").with_columns(pl.col("row").cast(pl.Int64))
    local = local_rows(table_run / "model", [str(csv)])
    assert_same_rows(local.select([c for c in local.columns if c not in rows.columns or c == "row"]), ray, key="row")
    assert counts["files"] == rows.height and counts["errors"] == 1
    assert "abc" in ray.filter(pl.col("row") == 3)["error"].item()


def test_a_table_the_model_cannot_read_is_the_local_error(ray_cluster, table_run, tmp_path):
    """An error an actor raises (a model column with no readable value) reaches the user as the local one does."""
    from pipelines.errors import ItfitsError
    csv = tmp_path / "words.csv"
    pl.read_csv(PENGUINS).with_columns(bill_length_mm=pl.lit("long")).write_csv(csv)
    with pytest.raises(ItfitsError) as local:
        local_rows(table_run / "model", [str(csv)])
    with pytest.raises(ItfitsError) as ray:
        predict_on_ray(table_run / "model", [str(csv)], tmp_path / "out")
    assert "column 'bill_length_mm'" in str(local.value) and "column 'bill_length_mm'" in str(ray.value)
    assert "\x1b" not in str(ray.value) and "Traceback" not in str(ray.value), "the message, not Ray's wrapping"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_audio_clips_with_bad_files_give_the_local_rows(ray_cluster, tmp_path):
    """A small audio bundle (3 clips a class of data/audio, 1 epoch at 48 px) on clips it has not seen, unknown clips
    and broken files."""
    data = tmp_path / "audio"
    for folder in sorted(AUDIO.iterdir()):
        (data / folder.name).mkdir(parents=True)
        for clip in sorted(folder.glob("*.flac"))[:3]:
            shutil.copyfile(clip, data / folder.name / clip.name)
    run = tmp_path / "audio_run"
    proc = run_cli("fit", data, "--out", run, "--epochs", "1", "--freeze-epochs", "0", "--size", "48", "--lr", "3e-3",
                   "--workers", "0", "--duration", "1", "--bs", "4", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero_bytes.wav").write_bytes(b"")
    (bad / "text_named.flac").write_text("this is not audio\n")
    inputs = [str(AUDIO / "kick"), str(AUDIO_UNKNOWN), str(bad)]
    out = tmp_path / "audio_preds"
    predict_on_ray(run / "model", inputs, out, PredictConfig(batch_size=8))
    ray = pl.read_parquet(out / "*.parquet")
    assert_same_rows(local_rows(run / "model", inputs, batch_size=8), ray)
    assert ray["error"].is_not_null().sum() == 2 and ray.height > 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """`ray start --head --block` on 127.0.0.1 in its own process group; that group is ended afterwards."""
    port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):  # its GCS listens within seconds; ray.init waits for the rest of the head
            if proc.poll() is not None:
                raise AssertionError(f"ray start --head exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("the Ray head did not listen in 2 minutes")
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: ray start then ends the processes it started
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group after 5 s
        except ProcessLookupError:
            pass
        # ray start records its address for the next ray.init() without one; `ray stop` would remove it
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()


@pytest.mark.slow
def test_cli_joins_a_cluster_started_by_ray_start(head_node, trained_run, tmp_path):
    """A fresh `itfits predict --address` (a subprocess: this process holds its own Ray already) on a head node."""
    inputs = [str(FASHION_TEST / "bag"), str(FASHION_TEST / "sneaker")]
    out = tmp_path / "joined"
    proc = run_cli("predict", trained_run.model, *inputs, "--out", out, "--engine", "ray", "--address", head_node,
                   "--concurrency", "1", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(local_rows(trained_run.model, inputs), pl.read_parquet(out / "*.parquet"))


def test_no_cluster_at_the_address_is_one_line(trained_run, tmp_path):
    proc = run_cli("predict", trained_run.model, str(FASHION_TEST), "--out", tmp_path / "p", "--engine", "ray",
                   "--address", f"127.0.0.1:{_free_port()}", env=ENV)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "ray start --head" in proc.stderr


def test_engine_ray_without_the_extra_says_how_to_install_it(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    proc = run_here("predict", trained_run.model, str(FASHION_TEST), "--out", tmp_path / "p", "--engine", "ray")
    assert proc.returncode == 1 and "pip install -e '.[ray]'" in proc.stderr and proc.stderr.count("\n") == 1


def test_ray_options_need_engine_ray(trained_run, tmp_path):
    proc = run_here("predict", trained_run.model, str(FASHION_TEST), "--out", tmp_path / "p.csv", "--concurrency", "2")
    assert proc.returncode == 1 and "--engine ray" in proc.stderr
    proc = run_here("predict", trained_run.model, str(FASHION_TEST), "--out", tmp_path / "p.csv", "--engine", "ray")
    assert proc.returncode == 1 and "writes Parquet" in proc.stderr
