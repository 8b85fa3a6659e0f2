"""Process-wide settings for CPU speed: malloc tuning and the CPU policy (threads, worker processes, how idle threads
wait), applied by the CLI (`app.cli.main` and the commands); a notebook can call them too. No torch at import."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ItfitsError

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (64-bit): allocations below it come from the heap
TRIM_THRESHOLD = 1 << 30  # free heap memory kept for reuse up to this much before any is returned to the OS


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that tensors free for the next tensors, instead of returning every
    large block to the OS and faulting fresh zeroed pages in for the next one. A forward pass allocates one
    activation after another (25 MiB each for a batch of 64 at 64 px), and by default each above glibc's moving
    threshold is mmap-ed, page-faulted in and unmapped: measured, 15-40% of CPU inference time (bench/BENCHMARKS.md).
    The cost: a process keeps its peak memory until it exits. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, Windows, musl without mallopt: their allocators behave otherwise
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def check_workers(workers: int | None) -> None:
    """--workers: None (chosen, see images.loader_workers) or a count of 0 (no worker processes) or more."""
    if workers is not None and workers < 0:
        raise ItfitsError(f"--workers must be 0 (no worker processes) or more, got {workers}")


# ---- the CPU policy: how many threads and worker processes, and how idle threads wait (issue 30) --------------

WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # libgomp's (torch's wheels) and Intel's OpenMP
# Training rows up to which a table trains on one thread (torch's and LightGBM's): a table's batches are too small
# for threads to share. With the machine busy (load 10 on 2 cores) a step of fastai's TabularModel at bs 32 took
# 8 ms on one thread and 350-570 on two, and LightGBM 1.1 s for 1,000 rows against 34-39 (bench/BENCHMARKS.md,
# "A table in seconds").
ONE_THREAD_ROWS = 100_000
_WAIT_LATE = []  # [True] where set_wait_policy set it after torch had loaded OpenMP (a notebook)
_APPLIED: list["CpuPolicy"] = []  # the policy of the work running now (cpu_threads), for run.json


def set_wait_policy() -> None:
    """OpenMP threads that wait for work sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning up to 300,000 times
    (libgomp's default) at every parallel region's end. Spinning costs nothing on an idle machine but takes the
    cores other programs (and this one's own DataLoader workers) need: beside 2 busy processes on 2 cores, a fit took
    4.2x its quiet time with spinning threads and 2.3x with PASSIVE (issue 30). OpenMP reads the environment once,
    when torch loads it, so the CLI calls this before anything imports torch; worker processes inherit it. A wait
    policy the user set (any of WAIT_ENV) is kept."""
    if not any(k in os.environ for k in WAIT_ENV):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _WAIT_LATE[:] = ["torch" in sys.modules]


def wait_policy() -> str:
    """The OpenMP wait policy this process runs with, in words."""
    given = ", ".join(f"{k}={os.environ[k]}" for k in WAIT_ENV if k in os.environ)
    if not given:
        return "OpenMP threads spin before they sleep (its default)"
    if _WAIT_LATE == [True]:
        return f"{given} for worker processes (torch had started OpenMP before)"
    return given


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (a container's --cpus), or None without one: cgroup v2's
    cpu.max ("max 100000" or "150000 100000"), else v1's cpu.cfs_quota_us / cpu.cfs_period_us."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    v1 = next((line.split(":", 2)[2] for line in lines if "cpu" in line.split(":", 2)[1].split(",")), None)
    places = []
    if v2 is not None:
        places += [(root / v2.lstrip("/") / "cpu.max", None), (root / "cpu.max", None)]
    if v1 is not None:
        for folder in ("cpu", "cpu,cpuacct"):
            places += [(root / folder / v1.lstrip("/"), "v1"), (root / folder, "v1")]
    for path, kind in places:
        try:
            if kind is None:
                quota, period = path.read_text().split()[:2]
            else:
                quota, period = (path / "cpu.cfs_quota_us").read_text(), (path / "cpu.cfs_period_us").read_text()
        except (OSError, ValueError):
            continue
        if quota.strip() in ("max", "-1"):
            return None
        return int(quota) / int(period)
    return None


def local_processes() -> int:
    """Processes of one data-parallel run on this machine (torchrun's and accelerate's LOCAL_WORLD_SIZE; Ray
    workers get their own OMP_NUM_THREADS); 1 otherwise."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def cpu_share() -> tuple[int, str]:
    """(cores, why): the cores this process may use: those it may run on (sched_getaffinity: taskset, a cpuset),
    within its cgroup's CPU quota, divided among the processes of a data-parallel run on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    why = ["the cores this process may run on"]
    quota = cgroup_cpus()
    if quota is not None and quota < cores:
        cores = max(1, int(quota))
        why.append(f"within its cgroup's CPU quota of {quota:g}")
    local = local_processes()
    if local > 1:
        cores = max(1, cores // local)
        why.append(f"shared by the {local} processes of this run on this machine")
    return cores, ", ".join(why)


@dataclass(frozen=True)
class CpuPolicy:
    """How a run uses the CPU: printed once at its start, run.json's resolved.cpu."""
    cores: int  # the cores this process may use (cpu_share)
    cores_why: str
    threads: int  # torch's intra-op threads (and LightGBM's)
    threads_why: str
    interop: int  # torch's inter-op threads
    workers: int | None  # DataLoader / decoding worker processes; None: each stage's own choice (images.loader_workers)
    workers_why: str
    wait: str  # the OpenMP wait policy (wait_policy)

    def line(self) -> str:
        workers = "chosen by each stage" if self.workers is None else f"{self.workers} ({self.workers_why})"
        return (f"cpu: {self.threads} thread{'s' * (self.threads > 1)} ({self.threads_why}), {self.interop} inter-op, "
                f"worker processes {workers}; {self.wait}; {self.cores} cores ({self.cores_why})")

    def json(self) -> dict:
        return asdict(self)


def cpu_policy(*, threads: int | None = None, workers: int | None = None, table: bool = False,
               rows: int | None = None) -> CpuPolicy:
    """The CPU policy of a run: `threads` and `workers` as given (--threads, --workers), else chosen from the cores
    available (cpu_share) and the size of the work: a table (`table`, or `rows` training rows up to
    ONE_THREAD_ROWS) one thread and no worker processes, since its batches are too small for threads to share;
    images and audio every core's thread, and images.loader_workers' worker processes."""
    check_workers(workers)
    if threads is not None and threads < 1:
        raise ItfitsError(f"--threads must be at least 1, got {threads}")
    cores, cores_why = cpu_share()
    small = table and (rows is None or rows <= ONE_THREAD_ROWS)
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads is not None:
        threads_why = "--threads"
    elif env_threads.isdigit() and int(env_threads) > 0:
        threads, threads_why = int(env_threads), "OMP_NUM_THREADS"
    elif small:
        threads, threads_why = 1, (f"a table of {rows:,} rows" if rows is not None else "a table")
    else:
        threads, threads_why = cores, "one per core available"
    if table:  # --workers too: a table's batches are tensors in memory, and its loader has no worker processes
        workers, workers_why = 0, "a table's rows are in memory"
    elif workers is not None:
        workers_why = "--workers"
    else:
        workers_why = "images.loader_workers"
    return CpuPolicy(cores=cores, cores_why=cores_why, threads=threads, threads_why=threads_why, interop=1,
                     workers=workers, workers_why=workers_why, wait=wait_policy())


@contextmanager
def cpu_threads(policy: CpuPolicy):
    """torch (and LightGBM, which takes torch's count) on the policy's threads while the block runs; the counts
    before are put back after (a notebook, the tests' commands in one process). Inter-op threads can be set once
    per process, before any inter-op work: where that has passed they stay."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(policy.threads)
    try:
        torch.set_num_interop_threads(policy.interop)
    except RuntimeError:  # set already, or inter-op work has started: torch allows it once
        pass
    _APPLIED.append(policy)
    try:
        yield policy
    finally:
        _APPLIED.pop()
        torch.set_num_threads(before)


def current_cpu_policy() -> dict | None:
    """run.json's resolved.cpu: the policy of the work running now (cpu_threads), with torch's counts read back."""
    if not _APPLIED:
        return None
    import torch
    return {**_APPLIED[-1].json(), "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}
