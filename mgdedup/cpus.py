"""How many CPUs this process may really use (threads for FAISS, decoding workers), and worker
processes that never outlive the process that started them."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def available_cpus() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def die_with_parent(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker is killed when the process that started it
    dies, even by SIGKILL (Linux PR_SET_PDEATHSIG), so a killed `index` never leaves workers
    holding hundreds of MB each. Elsewhere a no-op: the workers end when their queue closes."""
    del worker_id
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)
