"""What this machine offers the process, asked in one place."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from functools import lru_cache


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS reports one (a container's or taskset's share), else
    every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


BACKGROUND_NICE = 10  # CFS gives a nice-10 thread about a tenth of a core's share beside nice-0 work


def background_thread() -> None:
    """Makes the calling thread, and only it, a background one: at BACKGROUND_NICE (Linux: a thread id is a process
    id to setpriority), and one OpenMP thread for the parallel regions it starts (faiss's k-NN; OpenMP's thread
    count is per calling thread), so work done on it takes the CPU that queries leave idle. Where the system
    refuses, nothing changes."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="openmp")
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def give_back_freed_memory() -> None:
    """Hand memory freed inside the process back to the system. glibc keeps freed blocks of its per-thread heaps
    for reuse, so large temporary arrays made in worker threads raise a server's memory for good (20 new DBA
    matrices: +286 MiB while the matrices kept held 240); after such work, this trims every heap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
