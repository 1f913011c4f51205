"""What this machine offers the process, asked in one place."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS reports one (a container's or taskset's share), else
    every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
