"""Log modes (pipelines/logs.py): fit with --json-logs piped (every line one JSON object, one per epoch, lr_find,
check, calibration), predict --json-logs and --quiet, and the progress lines of long loops."""
from __future__ import annotations

import json

import pytest

from helpers import FASHION, run_cli, run_here
from pipelines import logs


def test_fit_json_logs_are_one_json_object_per_line(tmp_path):
    """A subprocess with stdout and stderr piped, lr_find included: every line of both parses as JSON."""
    proc = run_cli("fit", FASHION, "--out", tmp_path / "run", "--epochs", "1", "--freeze-epochs", "1", "--size", "32",
                   "--bs", "16", "--workers", "0", "--json-logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    errs = [json.loads(line) for line in proc.stderr.splitlines()]  # warnings, if any, are events too
    assert all(e["event"] == "warning" for e in errs)
    kinds = [e["event"] for e in events]
    assert kinds.count("epoch") == 2 and kinds.count("lr_find") == 1 and kinds.count("calibration") == 1
    assert kinds.count("check") == 2 and kinds[-1] == "done"
    epoch = next(e for e in events if e["event"] == "epoch")
    assert {"epoch", "phase", "train_loss", "valid_loss", "accuracy", "seconds"} <= epoch.keys()
    lr = next(e for e in events if e["event"] == "lr_find")
    assert lr["lr"] > 0 and "minimum" in lr["suggestions"]
    assert all(isinstance(e["message"], str) for e in events)


def test_predict_json_logs_and_quiet(trained_run, tmp_path):
    before = logs.log_mode()
    proc = run_here("predict", trained_run.model, str(trained_run.data / "bag"), "--out", tmp_path / "p.csv",
                    "--json-logs")
    assert proc.code == 0, proc.err
    done = [json.loads(line) for line in proc.out.splitlines()][-1]
    assert done["event"] == "done" and done["files"] > 0 and done["out"] == str(tmp_path / "p.csv")
    quiet = run_here("predict", trained_run.model, str(trained_run.data / "bag"), "--out", tmp_path / "q.csv",
                     "--quiet")
    assert quiet.code == 0 and quiet.out == "" and (tmp_path / "q.csv").is_file()
    assert logs.log_mode() == before  # the command's mode does not outlive it


def test_json_errors_are_json(tmp_path):
    proc = run_here("fit", tmp_path / "missing", "--out", tmp_path / "run", "--json-logs")
    assert proc.code == 1
    error = json.loads(proc.err.strip().splitlines()[-1])
    assert error["event"] == "error" and "does not exist" in error["message"]


@pytest.mark.parametrize("mode", ["lines", "json"])
def test_long_loops_report_every_few_seconds(mode, capsys, monkeypatch):
    """Progress in lines/json modes: nothing for a loop shorter than PROGRESS_SECONDS, else a line each time it
    passes and a last one at the end; no carriage returns."""
    monkeypatch.setattr(logs, "_mode", mode)
    list(logs.progress(range(5), total=5, what="quick"))
    assert capsys.readouterr().out == ""
    clock = iter(range(0, 1000, 4))  # each reading 4 s later: a line every third item
    monkeypatch.setattr(logs.time, "perf_counter", lambda: next(clock))
    list(logs.progress(range(9), total=9, what="slow"))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and len(lines) >= 3
    last = json.loads(lines[-1]) if mode == "json" else lines[-1]
    assert (last["done"], last["total"]) == (9, 9) if mode == "json" else last.startswith("slow: 9/9")
