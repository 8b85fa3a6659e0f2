"""Data-parallel training in processes started by `accelerate launch`, `torchrun`, or any launcher that sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: NCCL between GPUs, gloo between CPU processes.

fastai's `distrib_ctx` does not run on CPUs: its DistributedTrainer asks the prepared model for a
`.device` that only GPU models get, and its DistributedDL broadcasts the shuffled order through `.cuda()`. This
is the thin replacement, the same code on CPUs and GPUs: DistributedDataParallel around the model for each fit,
fastai's DistributedDL (with a broadcast on the process group's device) to give each process its own shard of
the training batches, and `is_main()` to let rank 0 alone write the run folder.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fastai.callback.core import Callback


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0  # this process among all of them, on every machine
    local_rank: int = 0  # this process on its machine: its GPU
    world_size: int = 1  # processes in all

    @classmethod
    def from_environ(cls) -> "DistEnv":
        get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
        return cls(rank=get("RANK", 0), local_rank=get("LOCAL_RANK", 0), world_size=get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True in the one process that writes the run folder (rank 0), and when not distributed."""
    return rank() == 0


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group():
    """Join the process group the launcher described in the environment; a no-op for a single process or when
    the caller has joined one already. Yields the DistEnv."""
    env = DistEnv.from_environ()
    if env.world_size <= 1 or dist.is_initialized():
        yield env
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)  # fastai's default_device() then picks this GPU for the DataLoaders
    dist.init_process_group(backend(), rank=env.rank, world_size=env.world_size)
    try:
        yield env
    finally:
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` in every process (e.g. the lr rank 0's lr_find chose); `obj` itself when not
    distributed."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@functools.cache
def sharded_dl_class():
    """fastai's DistributedDL (rank 0's shuffled order, padded, cut into one disjoint slice per process) with the
    broadcast on the backend's device: fastai's own calls `.cuda()`, which gloo on a CPU has no use for.
    Built on first use: fastai.distributed imports accelerate, which a single-process run does not need."""
    from fastai.distributed import DistributedDL

    class ShardedDL(DistributedDL):
        def _broadcast(self, t, rank):
            on_gpu = dist.get_backend() == "nccl"
            t = torch.tensor(t, dtype=torch.long, device=torch.device("cuda", torch.cuda.current_device()) if on_gpu
                             else torch.device("cpu"))
            dist.broadcast(t, rank)
            return t.cpu().tolist()

    return ShardedDL


def sharded(dl):
    """The shard of the fastai DataLoader `dl` that this process trains on."""
    return sharded_dl_class()(dl, rank=rank(), world_size=world_size())


class DataParallel(Callback):
    """DistributedDataParallel for each fit: gradients are averaged over the processes at every backward, BatchNorm
    buffers broadcast from rank 0 at every forward, so all replicas stay equal. Each process trains on its shard of
    the training set; each validates the whole validation set, so metrics equal those of one process.
    On GPUs, BatchNorm becomes SyncBatchNorm (statistics over the global batch), as in fastai's DistributedTrainer."""
    order = 12  # after EMA (11) has copied the bare model, before the schedulers; after TrainEvalCallback's .to(device)

    def __init__(self, *, sync_bn: bool = True):
        self.sync_bn = sync_bn

    def before_fit(self):
        from torch.nn.parallel import DistributedDataParallel
        model = self.learn.model
        if torch.cuda.is_available():
            if self.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.learn.model = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        else:
            self.learn.model = DistributedDataParallel(model)
        self.train_dl = self.dls.loaders[0]
        self.learn.dls.loaders[0] = sharded(self.train_dl)

    def after_fit(self):
        self.learn.model = self.learn.model.module
        self.learn.dls.loaders[0] = self.train_dl
