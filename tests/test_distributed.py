"""Data-parallel training: two CPU processes joined with gloo, as `torchrun --nproc_per_node 2` (or `accelerate
launch`) starts them, each train on their own half of the data; rank 0 alone writes the run folder, and the
weights it saves are those both ranks end with."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from helpers import FASHION, REPO, free_port

WORLD = 2


def worker():
    """One rank, started with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as a launcher sets them. It trains through
    the same stages as `itfits fit`, then records what the test checks: its weights, its shard and its history.
    Each rank is given its own --out, so a write by rank 1 would show."""
    from pathlib import Path
    from safetensors.torch import save_file
    from pipelines.distributed import is_main, process_group, sharded, world_size
    from pipelines.image_modality import IMAGES
    from pipelines.run import FitConfig, finish_files, train_files

    rank, out = int(os.environ["RANK"]), Path(os.environ["ITFITS_TEST_OUT"])
    config = FitConfig(data=str(FASHION), out=str(out / f"run{rank}"), epochs=1, freeze_epochs=1, size=32, lr=3e-3,
                       bs=16, num_workers=0, precision="fp32", seed=5)
    with process_group():
        trained = train_files(IMAGES, config, log=print)
        if is_main():
            finish_files(IMAGES, trained, config, log=print)
        shard = list(sharded(trained.learn.dls.train).get_idxs())  # the slice of one epoch's shuffled order
        state = {k: v.detach().contiguous() for k, v in trained.learn.model.state_dict().items()}
        save_file(state, str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps({
            "world_size": world_size(), "shard": shard, "n_train": len(trained.learn.dls.train_ds),
            "history": trained.history.to_dicts()}))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ITFITS_TEST_OUT": str(out),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        code = "from test_distributed import worker; worker()"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("data-parallel training did not finish in 10 minutes (a collective waiting forever?)")
        results.append((p.returncode, stdout, stderr))
    for rank, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)], results


def test_both_ranks_joined_and_trained_disjoint_halves(ranks):
    _, info, _ = ranks
    assert [i["world_size"] for i in info] == [WORLD] * WORLD
    n_train = info[0]["n_train"]
    shards = [set(i["shard"]) for i in info]
    assert not shards[0] & shards[1], "the ranks' shards overlap"
    assert shards[0] | shards[1] == set(range(n_train)), "together the shards cover the training set"
    for i in info:  # each rank trained on half the images per epoch (less a partial last batch)
        history = pl.DataFrame(i["history"])
        assert history["phase"].to_list() == ["frozen", "unfrozen"]
        assert all(n_train // WORLD - 16 < n <= -(-n_train // WORLD) for n in history["images"]), history["images"]


def test_only_rank_0_writes_the_run_folder(ranks):
    out, _, results = ranks
    run0 = out / "run0"
    for name in ["model/model.safetensors", "model/itfits.json", "run.json", "history.csv", "checkpoints/last.pt",
                 "skipped.csv"]:
        assert (run0 / name).is_file(), f"rank 0 did not write {name}"
    assert not (out / "run1").exists(), "rank 1 wrote into its run folder"
    assert "valid accuracy" in results[0][1] and "valid accuracy" not in results[1][1], "rank 1 printed the log too"
    summary = json.loads((run0 / "run.json").read_text())
    assert summary["resolved"]["world_size"] == WORLD and summary["resolved"]["effective_bs"] == 16 * WORLD


def test_saved_weights_are_those_every_rank_ended_with(ranks):
    out, _, _ = ranks
    saved = {k: v for k, v in load_file(str(out / "run0" / "model" / "model.safetensors")).items()
             if not k.startswith(("unknown.", "reference."))}  # statistics, and the pretrained body as it was
    for rank in range(WORLD):
        ended = load_file(str(out / f"rank{rank}.safetensors"))
        assert set(ended) == set(saved), "state dict keys differ (a DDP `module.` prefix?)"
        for k, v in saved.items():
            assert torch.equal(ended[k], v), f"rank {rank} ended with other values of {k} than the bundle holds"
