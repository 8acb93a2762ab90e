"""Thread policy: how many threads torch, BLAS and MLX use, decided once per process and recorded.

Shared machines punish spinning thread pools: an OpenBLAS or OpenMP pool of N threads that
busy-waits against a neighbour holding a core runs many times slower than one thread. So:

- the thread count is the cores this process may actually use (CPU affinity, and a cgroup CPU
  quota when one is set), or ``--threads N`` / ``PARITY_THREADS``; torch gets it;
- the metric passes (:mod:`parity.metrics`) run their BLAS dots single-threaded
  (:func:`single_threaded_blas`): they are memory-bound, a second thread buys nothing there;
- reports record the decision (:func:`current`), with the BLAS MLX computes with.
"""
from __future__ import annotations

import math
import os
import re
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Iterator

from parity.vocab import InputError

ENV_THREADS = "PARITY_THREADS"
_chosen: dict[str, Any] = {}


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 / v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.floor(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def configure(threads: int | None = None) -> int:
    """Choose the thread count (argument, ``PARITY_THREADS``, or the available cores); torch gets it when it is
    first used (:func:`apply_to_torch`), so a command that never runs a reference never imports torch."""
    if threads is None and os.environ.get(ENV_THREADS):
        value = os.environ[ENV_THREADS]
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"{ENV_THREADS}={value!r}: expected a positive integer")
        threads = int(value)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"--threads: expected a positive integer, got {threads!r}")
    count = threads or available_cores()
    _chosen.update(threads=count, source="--threads/PARITY_THREADS" if threads else "available cores")
    return count


def apply_to_torch() -> None:
    """Give torch the chosen thread count (choosing it first if nobody has); a no-op after the first call."""
    if "threads" not in _chosen:
        configure()
    if _chosen.get("torch_applied"):
        return
    import torch

    torch.set_num_threads(_chosen["threads"])
    _chosen["torch_applied"] = True


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS calls inside run on one thread (a memory-bound pass gains nothing from more)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def current() -> dict[str, Any]:
    """The thread decision and the BLAS libraries in use, for report metadata."""
    info: dict[str, Any] = {"available_cores": available_cores(),
                            **{k: v for k, v in _chosen.items() if k != "torch_applied"}}
    if sys.modules.get("torch") is not None:
        info["torch"] = sys.modules["torch"].get_num_threads()
    info["blas"] = _blas_pools()
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}
    return info


@cache
def _blas_pools() -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_info

    return [{k: pool.get(k) for k in ("internal_api", "num_threads", "version", "architecture", "filepath")}
            for pool in threadpool_info()]


def mlx_blas() -> str:
    """The BLAS behind MLX's float32 CPU matmuls and convolutions.

    Linux ``mlx[cpu]`` wheels bundle the netlib reference BLAS, ~30x slower than OpenBLAS at
    float32 GEMM; a preloaded OpenBLAS (``LD_PRELOAD``) replaces it.
    """
    preloaded = [Path(p).name for p in re.split(r"[\s:]+", os.environ.get("LD_PRELOAD", "")) if "blas" in p.lower()]
    if preloaded:
        return f"{preloaded[0]} (LD_PRELOAD)"
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        import mlx
    except ImportError:
        return "unavailable"
    bundled = sorted(Path(mlx.__path__[0]).parent.glob("mlx_cpu.libs/libblas*"))
    return f"{bundled[0].name} (bundled netlib reference BLAS)" if bundled else "system"
