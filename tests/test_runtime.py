"""The process the CLI starts: help and usage errors without torch (issue 31 item 4), and the CPU policy (issue 30):
thread counts and the OpenMP wait policy read back in a fresh interpreter, --threads / --workers, run.json's record."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

# every command's --help and two usage errors, in one fresh interpreter; the heavy packages imported after each
STARTUP = """
import json, sys
from app.cli import app, main
names = [c.name or c.callback.__name__.replace('_', '-') for c in app.registered_commands]
calls = [['--help'], *[[n, '--help'] for n in names], ['fit', 'data', '--epochs', 'many'], ['predict']]
seen = []
for args in calls:
    sys.argv = ['itfits', *args]
    try:
        main()
    except SystemExit as e:
        code = e.code
    seen.append([args, code, [m for m in ('torch', 'fastai', 'timm', 'lightgbm') if m in sys.modules]])
print('SEEN ' + json.dumps(seen), file=sys.stderr)
"""


def test_help_and_usage_errors_import_no_torch():
    proc = subprocess.run([sys.executable, "-c", STARTUP], cwd=REPO, capture_output=True, text=True, timeout=120)
    seen = json.loads(proc.stderr.split("SEEN ", 1)[1])
    assert len(seen) > 10  # --help, each command's, the usage errors
    for args, code, heavy in seen:
        assert code in (0, 2), f"itfits {' '.join(args)} exited {code}"  # 2: click's usage error
        assert heavy == [], f"itfits {' '.join(args)} imported {heavy}"


# the policy of a table, then of images, applied in a fresh interpreter as the CLI does: the wait policy set before
# torch loads OpenMP (libgomp prints what it read with OMP_DISPLAY_ENV: PASSIVE spins 0 times, its default 300,000),
# then torch's counts read back
APPLIED = """
import json, os, sys
from pipelines.runtime import cpu_policy, cpu_threads, set_wait_policy
set_wait_policy()
import torch
seen = {}
with cpu_threads(cpu_policy(table=True, rows=500)) as p:
    seen['table'] = [torch.get_num_threads(), torch.get_num_interop_threads(), p.threads, p.wait]
with cpu_threads(cpu_policy()) as p:
    seen['images'] = [torch.get_num_threads(), torch.get_num_interop_threads(), p.threads, p.wait]
seen['cores'] = len(os.sched_getaffinity(0))
print('SEEN ' + json.dumps(seen))
"""


def _fresh(code: str, **env) -> tuple[dict, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                              "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("SEEN ", 1)[1]), proc.stdout + proc.stderr


def test_policy_is_applied_before_torch_starts():
    seen, output = _fresh(APPLIED)
    assert "GOMP_SPINCOUNT = '0'" in output  # libgomp's own report of what it read at start
    assert seen["table"] == [1, 1, 1, "OMP_WAIT_POLICY=PASSIVE"]
    assert seen["images"] == [seen["cores"], 1, seen["cores"], "OMP_WAIT_POLICY=PASSIVE"]
    # the user's choices stand: their wait policy and thread count
    seen, output = _fresh(APPLIED, GOMP_SPINCOUNT="1000", OMP_NUM_THREADS="1")
    assert "GOMP_SPINCOUNT = '1000'" in output and seen["images"][:3] == [1, 1, 1]
    assert seen["images"][3] == "GOMP_SPINCOUNT=1000"


def test_cores_are_shared_among_a_runs_processes(monkeypatch):
    from pipelines import runtime
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's and accelerate's: two processes on this machine
    assert runtime.cpu_policy().threads == max(1, cores // 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(runtime, "cgroup_cpus", lambda: 1.5)  # a container's --cpus 1.5
    assert runtime.cpu_policy().threads == 1
    assert runtime.cpu_policy(threads=3).threads == 3


def test_cgroup_quota(tmp_path, monkeypatch):
    from pipelines.runtime import cgroup_cpus
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")  # v1; cpu.max is v2's
    for v2, v1, cores in (("150000 100000\n", "150000\n", 1.5), ("max 100000\n", "-1\n", None)):
        (tmp_path / "cpu.max").write_text(v2)
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1)
        assert cgroup_cpus(tmp_path) == cores


def test_threads_and_workers_flags(table_run, trained_run, tmp_path, monkeypatch):
    import torch
    import pipelines.predict
    from helpers import FASHION_TEST, run_here
    before = torch.get_num_threads()
    # run.json records the policy: a table's one thread; images' fixture ran with --workers 0
    assert json.loads((table_run / "run.json").read_text())["resolved"]["cpu"]["threads"] == 1
    images = trained_run.summary["resolved"]["cpu"]
    assert images["workers"] == 0 and images["workers_why"] == "--workers" and "cpu: " in trained_run.stdout
    # --threads overrides, on fit (read back by torch while it trained: run.json's count) and on predict
    proc = run_here("fit", REPO / "data" / "penguins.csv", "--target", "species", "--ignore", "year", "--model",
                    "gbdt", "--threads", "2", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.err[-2000:]
    cpu = json.loads((tmp_path / "run" / "run.json").read_text())["resolved"]["cpu"]
    assert (cpu["threads"], cpu["threads_why"]) == (2, "--threads") and "cpu: 2 threads (--threads)" in proc.out
    during = []
    write = pipelines.predict.write_predictions
    monkeypatch.setattr(pipelines.predict, "write_predictions",
                        lambda rows, out: during.append(torch.get_num_threads()) or write(rows, out))
    proc = run_here("predict", trained_run.model, FASHION_TEST / "bag", "--out", tmp_path / "p.csv", "--threads", "1",
                    "--workers", "1")
    assert proc.returncode == 0, proc.err[-2000:]
    assert during == [1] and "cpu: 1 thread (--threads), 1 inter-op, worker processes 1 (--workers)" in proc.out
    assert torch.get_num_threads() == before  # put back after the command


def test_threads_below_one_fail_up_front(tmp_path, monkeypatch):
    import pipelines.run
    from app.cli import app
    from pipelines.errors import ItfitsError
    monkeypatch.setattr(pipelines.run, "fit", lambda *a, **k: pytest.fail("--threads 0 reached training"))
    for args in (["fit", REPO / "data" / "fashion", "--out", tmp_path / "run"],
                 ["predict", "model", "x.png", "--out", tmp_path / "p.csv"], ["evaluate", "model", "data"]):
        with pytest.raises(ItfitsError, match="--threads must be at least 1, got 0"):
            app([*map(str, args), "--threads", "0"], standalone_mode=False)
    with pytest.raises(ItfitsError, match="--threads is for --engine local"):
        app(["predict", "model", "x.png", "--out", str(tmp_path / "p"), "--engine", "ray", "--threads", "2"],
            standalone_mode=False)
