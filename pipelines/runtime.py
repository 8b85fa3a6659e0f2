"""Process-wide settings for CPU speed, applied once by the CLI (`app.cli.main`); a notebook can call them too."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

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
