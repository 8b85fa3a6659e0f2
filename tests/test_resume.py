"""Checkpoints and `itfits fit --resume RUN`: a training process killed with SIGKILL after its first epoch goes on
where it stopped and ends as the uninterrupted run would have."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from helpers import FASHION, FASHION_TEST, REPO, run_cli, run_here

# 2 frozen + 2 unfrozen epochs: the kill after the first epoch lands in the middle of the first phase, so the
# resumed run continues that phase's one-cycle schedule, then goes into the second. With EMA, whose state (the
# averaged weights, the decay's warm-up position) must survive the kill too.
RESUME_ARGS = ["--epochs", "2", "--freeze-epochs", "2", "--size", "32", "--lr", "3e-3", "--bs", "16", "--workers", "0",
               "--precision", "fp32", "--seed", "3", "--ema"]
TOTAL = 4


def _kill_after_first_checkpoint(run, args) -> int:
    """Start `itfits fit`, SIGKILL it as soon as its first checkpoint exists; the epoch that checkpoint holds."""
    ckpt = run / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "fit", str(FASHION), "--out", str(run), *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ckpt.exists():
        assert proc.poll() is None, f"fit ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    run = root / "run"
    killed_after = _kill_after_first_checkpoint(run, RESUME_ARGS)
    assert not (run / "run.json").exists() and not (run / "model").exists(), "the killed run must not look finished"
    proc = run_cli("fit", "--resume", run, "--workers", "0")
    assert proc.returncode == 0, f"resume failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return run, killed_after, proc


def test_checkpoint_files_are_plain_tensors_and_values(resumed):
    run, killed_after, _ = resumed
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)  # no pickled objects
    assert {"model", "opt", "rng", "epoch", "history", "lr", "precision"} <= set(state)
    assert state["epoch"] == TOTAL and len(state["history"]) == TOTAL
    assert set(state["ema"]["model"]) == set(state["model"]) and 0 < state["ema"]["decay"] < 1
    assert not any(k.startswith("_orig_mod.") or k.startswith("module.") for k in state["model"])
    config = json.loads((run / "checkpoints" / "config.json").read_text())
    assert config["epochs"] == 2 and config["freeze_epochs"] == 2 and config["resume"] is False


def test_resumed_run_finishes_every_planned_epoch(resumed):
    run, killed_after, proc = resumed
    assert 1 <= killed_after < TOTAL
    assert f"resuming {run}: {killed_after} of {TOTAL} epochs done" in proc.stdout
    history = pl.read_csv(run / "history.csv")
    assert history["epoch"].to_list() == list(range(TOTAL))
    assert history["phase"].to_list() == ["frozen", "frozen", "unfrozen", "unfrozen"]
    summary = json.loads((run / "run.json").read_text())
    assert summary["resolved"]["resumed_after_epoch"] == killed_after
    assert summary["config"]["resume"] is True and summary["config"]["epochs"] == 2
    assert summary["resolved"]["precision"]["precision"] == "fp32"


def test_resumed_run_equals_the_uninterrupted_one(resumed, tmp_path):
    """Same phase, same one-cycle position, same optimizer and RNG states: fp32 on one thread, the resumed run
    ends with the very weights of a run that was never stopped."""
    run, _, _ = resumed
    proc = run_cli("fit", FASHION, "--out", tmp_path / "whole", *RESUME_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(run / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    weights = [k for k in a if not k.startswith("unknown.")]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in weights)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run's by up to {worst}"
    h_a, h_b = pl.read_csv(run / "history.csv"), pl.read_csv(tmp_path / "whole" / "history.csv")
    assert h_a["train_loss"].to_list() == pytest.approx(h_b["train_loss"].to_list(), rel=1e-4)


def test_resumed_bundle_predicts(resumed, tmp_path):
    run, _, _ = resumed
    out = tmp_path / "p.csv"
    proc = run_here("predict", run / "model", FASHION_TEST, "--out", out, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pl.read_csv(out)
    truth = df["path"].map_elements(lambda p: p.replace("\\", "/").split("/")[-2], return_dtype=pl.String)
    assert df["error"].null_count() == df.height and (df["top1"] == truth).mean() > 0.5


def test_resume_errors_name_the_way_out(resumed, tmp_path):
    run, _, _ = resumed
    proc = run_here("fit", "--resume", run)
    assert proc.returncode == 1 and "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_here("fit", "--resume", tmp_path / "nowhere")
    assert proc.returncode == 1 and "can be resumed" in proc.stderr
    proc = run_here("fit")
    assert proc.returncode == 1 and "--resume" in proc.stderr


def test_a_moved_run_resumes_where_it_is_with_its_data_from_anywhere(tmp_path, monkeypatch):
    """config.json keeps DATA as an absolute path, and a run resumes in the folder given: a moved or copied run
    folder never writes into the old one. A damaged config.json is a one-line error."""
    from pipelines.errors import ItfitsError
    from pipelines.run import FitConfig, resume_config, write_run_config
    monkeypatch.chdir(REPO)  # data/fashion is relative to it
    write_run_config(FitConfig(data="data/fashion", out=str(tmp_path / "a")), tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    config = resume_config(tmp_path / "b")
    assert config.out == str(tmp_path / "b") and config.data == str(FASHION) and config.resume
    for damage in ("{", "[1, 2]", "\udcff"):
        (tmp_path / "b" / "checkpoints" / "config.json").write_bytes(damage.encode("utf-8", "surrogateescape"))
        with pytest.raises(ItfitsError, match="config.json"):
            resume_config(tmp_path / "b")


def test_resume_at_a_phase_boundary_starts_the_next_phase_as_fine_tune_does(tmp_path):
    """A checkpoint that ended the head-only phase: the resumed run starts the unfrozen phase with a cleared
    optimizer state and a fresh EMA, as fastai's fine_tune does, and ends with the uninterrupted run's weights."""
    from fastai.torch_core import set_seed
    from pipelines.backbones import get_spec
    from pipelines.checkpoints import load_checkpoint
    from pipelines.images import ImagePreprocessing, image_dataloaders
    from pipelines.learners import image_learner
    from pipelines.precision import resolve_precision
    from pipelines.sources import check_files, read_source, require_classes
    from pipelines.training import train

    items = check_files(read_source(FASHION, seed=2))
    classes, spec = require_classes(items), get_spec("efficientnet_lite0")
    prep = ImagePreprocessing(size=32, mean=spec.mean, std=spec.std)

    def learner(run):
        set_seed(2)
        dls = image_dataloaders(items, classes=classes, prep=prep, bs=16, num_workers=0)
        return image_learner(dls, "efficientnet_lite0", path=run, ema=True,
                             precision=resolve_precision("fp32", arch="efficientnet_lite0", size=32))

    whole = learner(tmp_path / "whole")
    train(whole, epochs=1, lr=3e-3, freeze_epochs=1, checkpoints=tmp_path / "whole" / "checkpoints")
    head_only = learner(tmp_path / "cut")
    train(head_only, epochs=0, lr=3e-3, freeze_epochs=1, checkpoints=tmp_path / "cut" / "checkpoints",
          checkpoint_meta={"lr": 3e-3})
    state = load_checkpoint(tmp_path / "cut")
    assert state["epoch"] == 1
    resumed = learner(tmp_path / "cut")
    history = train(resumed, epochs=1, lr=3e-3, freeze_epochs=1, checkpoints=tmp_path / "cut" / "checkpoints",
                    resume=state)
    assert history["phase"].to_list() == ["frozen", "unfrozen"]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_flags_beside_resume_are_ignored_with_a_warning(tmp_path):
    """The warning comes before the run folder is read, so a folder that cannot be resumed shows it too."""
    proc = run_cli("fit", "--resume", tmp_path / "nowhere", "--epochs", "9", "--size", "64", "--workers", "0")
    assert proc.returncode == 1 and "can be resumed" in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:") and "ignored:" in line]
    assert len(warning) == 1 and "--epochs" in warning[0] and "--size" in warning[0], proc.stderr
    assert "--workers" not in warning[0], "--workers may be changed on resume"


def test_a_run_killed_after_its_last_epoch_is_finished_by_resume(tmp_path):
    """Killed after the last checkpoint but before the bundle was written (calibration of a large data set takes
    minutes): --resume writes the bundle from the checkpoint's (EMA) weights instead of refusing, pointing at a
    bundle that does not exist."""
    import shutil
    from pipelines.run import FitConfig, fit, resume_config
    run, quiet = tmp_path / "run", (lambda *a, **k: None)
    fit(FitConfig(data=str(FASHION), out=str(run), epochs=1, freeze_epochs=0, size=32, lr=3e-3, bs=16,
                  num_workers=0, precision="fp32", seed=3, ema=True), log=quiet)
    whole = load_file(str(run / "model" / "model.safetensors"))
    shutil.rmtree(run / "model")
    (run / "run.json").unlink()
    lines = []
    summary = fit(resume_config(run), log=lines.append)
    assert any("finishing it" in line for line in lines) and summary["resolved"]["resumed_after_epoch"] == 1
    finished = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(whole[k], finished[k]) for k in whole if not k.startswith("unknown."))
    assert pl.read_csv(run / "history.csv").height == 1


def test_resume_with_accumulation_left_over_at_epoch_and_phase_ends(tmp_path):
    """12 batches an epoch and --accum 5: 2 micro-batches are summed when an epoch ends. Their gradients go on into
    the next epoch of the phase, so a checkpoint holds them (a resumed run steps where the uninterrupted one does),
    and are dropped at the next phase's start (computed on other weights, with the body frozen), with or without a
    kill there."""
    from fastai.callback.core import Callback
    from fastai.torch_core import set_seed
    from pipelines.backbones import get_spec
    from pipelines.checkpoints import load_checkpoint
    from pipelines.images import ImagePreprocessing, image_dataloaders
    from pipelines.learners import image_learner
    from pipelines.precision import resolve_precision
    from pipelines.sources import check_files, read_source, require_classes
    from pipelines.training import train

    items = check_files(read_source(FASHION, seed=2))
    classes, spec = require_classes(items), get_spec("efficientnet_lite0")
    prep = ImagePreprocessing(size=32, mean=spec.mean, std=spec.std)

    class Killed(Exception):
        pass

    class KillAfter(Callback):  # a SIGKILL right after the checkpoint of epoch `n` (counted over both phases)
        order = 60

        def __init__(self, n):
            self.n, self.seen = n, 0

        def after_epoch(self):
            self.seen += 1
            if self.seen == self.n:
                raise Killed("SIGKILL")

    def learner(run):
        set_seed(2)
        dls = image_dataloaders(items, classes=classes, prep=prep, bs=16, num_workers=0)
        assert len(dls.train) == 12
        return image_learner(dls, "efficientnet_lite0", path=run, accum=5,
                             precision=resolve_precision("fp32", arch="efficientnet_lite0", size=32))

    kw = dict(epochs=2, lr=3e-3, freeze_epochs=1)
    whole = learner(tmp_path / "whole")
    train(whole, checkpoints=tmp_path / "whole" / "checkpoints", **kw)
    for kill_after in (1, 2):  # at the phase boundary; in the middle of the unfrozen phase
        run = tmp_path / f"cut{kill_after}"
        cut = learner(run)
        cut.add_cb(KillAfter(kill_after))
        with pytest.raises(Killed):
            train(cut, checkpoints=run / "checkpoints", **kw)
        state = load_checkpoint(run)
        assert state["epoch"] == kill_after and state["accum"]["count"] == 2 * 16
        resumed = learner(run)
        train(resumed, checkpoints=run / "checkpoints", resume=state, **kw)
        a, b = whole.model.state_dict(), resumed.model.state_dict()
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst < 1e-5, f"killed after epoch {kill_after}: resumed weights differ by up to {worst}"
