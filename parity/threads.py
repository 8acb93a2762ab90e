"""Thread policy and MLX's BLAS: decided per run, applied to torch and every BLAS pool, recorded in reports.

Shared machines punish spinning thread pools: an OpenMP or OpenBLAS pool whose threads wait at
a barrier for a thread the scheduler gave away to a neighbour runs a small op 10-70x slower than
one thread does. So:

- the thread count is chosen once per run (:func:`apply`): ``--threads N`` / ``PARITY_THREADS``
  when given; else one thread for a small reference (every fixture config: its ops are far too
  small to split, and a 2-thread pool ran them 10-70x slower next to a busy core), and the cores
  this process may use (CPU affinity, capped by a cgroup CPU quota) for a big one. Torch and
  every BLAS pool get it;
- the metric passes (:mod:`parity.metrics`) are memory-bound: their BLAS dots run on one thread
  (:func:`single_threaded_blas`);
- MLX's float32 GEMM: the Linux ``mlx[cpu]`` wheel bundles the netlib reference BLAS (~30x
  slower than OpenBLAS). :func:`load_mlx_blas` (run when :mod:`parity` is imported) puts a system
  OpenBLAS in the process's global symbol scope just before MLX is imported (after PyTorch, whose
  own BLAS symbols it would otherwise take over), so MLX binds to it; ``PARITY_MLX_BLAS=bundled``
  keeps the wheel's, ``PARITY_MLX_BLAS=<library>`` names another.
- reports record all of it (:func:`current`, :func:`mlx_blas`).
"""
from __future__ import annotations

import ctypes
import importlib.abc
import importlib.util
import math
import os
import re
import sys
from functools import cache, wraps
from pathlib import Path
from typing import Any, Callable, TypeVar

from parity.vocab import InputError

T = TypeVar("T")
ENV_THREADS = "PARITY_THREADS"
ENV_MLX_BLAS = "PARITY_MLX_BLAS"
#: The system OpenBLAS MLX is given when ``PARITY_MLX_BLAS`` is unset (Debian/Ubuntu ``libopenblas0-pthread``, Fedora ``openblas``).
SYSTEM_OPENBLAS = "libopenblas.so.0"
INSTALL_HINT = "apt-get install libopenblas0-pthread"
#: OpenBLAS kernels older than AVX: an old OpenBLAS that does not know a newer CPU falls back to these.
_PRE_AVX_KERNELS = {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai", "coppermine",
                    "northwood", "banias", "opteron", "opteron_sse3", "barcelona"}

#: A reference with fewer parameters runs on one thread unless asked otherwise (see :func:`decide`).
SMALL_REFERENCE = 10_000_000

_requested: dict[str, Any] = {}
_chosen: dict[str, Any] = {}
_mlx_blas: dict[str, Any] = {}
_said: set[str] = set()


# --- how many threads -----------------------------------------------------------------------

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


def _positive(value: Any, option: str) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise InputError(f"{option}: expected a positive integer, got {value!r}")
    return int(text)


def configure(threads: int | str | None = None) -> None:
    """Record ``--threads N`` (None: ``PARITY_THREADS``, else the policy decides per run) and check the environment.

    A bad count or an unusable ``PARITY_MLX_BLAS`` is an :class:`InputError`, before anything runs.
    """
    wanted = os.environ.get(ENV_MLX_BLAS, "").strip()
    if _mlx_blas.get("error"):
        raise InputError(_mlx_blas["error"])
    if wanted and wanted != "bundled":
        try:
            ctypes.CDLL(wanted)
        except OSError as err:
            raise InputError(f"{ENV_MLX_BLAS}={wanted!r}: cannot load it ({err})") from None
    _requested.clear()
    if threads is not None:
        _requested.update(threads=_positive(threads, "--threads"), source="--threads")
    requested()


def requested() -> tuple[int, str] | None:
    """The count the user asked for (``--threads``, else ``PARITY_THREADS``) and where it came from, or None."""
    if _requested:
        return _requested["threads"], _requested["source"]
    value = os.environ.get(ENV_THREADS, "").strip()
    return (_positive(value, ENV_THREADS), ENV_THREADS) if value else None


def decide(parameters: int | None = None) -> tuple[int, str]:
    """The thread count for a run whose reference has ``parameters`` weights, and why.

    Asked for: that. A reference under ``SMALL_REFERENCE`` parameters (every fixture config):
    one thread, its ops are too small to split and a pool loses to any neighbour. Otherwise the
    available cores.
    """
    asked = requested()
    if asked:
        return asked
    cores = available_cores()
    if parameters is not None and parameters < SMALL_REFERENCE and cores > 1:
        return 1, f"small reference ({parameters:,} < {SMALL_REFERENCE:,} parameters)"
    return cores, "available cores"


def apply(parameters: int | None = None) -> int:
    """Decide (:func:`decide`) and give the count to torch (when imported) and every BLAS pool; run once per run."""
    count, source = decide(parameters)
    _chosen.update(threads=count, source=source)
    _blas_controller().limit(limits=count)  # applied now, kept (not used as a context)
    if sys.modules.get("torch") is not None:
        sys.modules["torch"].set_num_threads(count)
    return count


def single_threaded_blas(function: Callable[..., T]) -> Callable[..., T]:
    """Decorator: ``function``'s BLAS calls run on one thread (a memory-bound pass gains nothing from more,
    and loses to a neighbour). A few microseconds a call: the pools found once, only those not at 1 touched."""
    @wraps(function)
    def one_thread(*args: Any, **kwargs: Any) -> T:
        pools = [(pool, pool.num_threads) for pool in _blas_controller().lib_controllers]
        for pool, count in pools:
            if count != 1:
                pool.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            for pool, count in pools:
                if count != 1:
                    pool.set_num_threads(count)
    return one_thread


@cache
def _controller() -> Any:
    """Every thread pool loaded when first asked (numpy's and MLX's BLAS among them), found once: a scan costs ~1 ms."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@cache
def _blas_controller() -> Any:
    return _controller().select(user_api="blas")


# --- MLX's BLAS ---------------------------------------------------------------------------------

def load_mlx_blas() -> None:
    """Arrange for MLX's float32 GEMM to bind to a system OpenBLAS (run by ``import parity``; Linux).

    Python loads extension modules with ``RTLD_NOW``: a library's symbols are bound when it is
    imported, global symbol scope first. So, just before MLX is first imported (an import hook,
    :class:`_BeforeMlx`), PyTorch is imported if it is installed (its MKL symbols, ``sgemm_`` and
    the rest, must bind to its own MKL: an OpenBLAS already in the global scope would take them
    over and change the reference), then the OpenBLAS joins the global scope, then MLX binds its
    ``cblas_sgemm`` to it ahead of the wheel's bundled netlib ``libblas``. A no-op when MLX is
    already imported (noted), ``LD_PRELOAD`` names a BLAS, or ``PARITY_MLX_BLAS=bundled``.
    """
    if _mlx_blas or sys.platform != "linux":
        return
    wanted = os.environ.get(ENV_MLX_BLAS, "").strip()
    if wanted == "bundled" or _preloaded():
        _mlx_blas["how"] = "bundled" if wanted == "bundled" else "LD_PRELOAD"
    elif "mlx.core" in sys.modules:
        _mlx_blas.update(how="bundled", note="MLX was imported before parity")
    else:
        _mlx_blas["how"] = "pending"
        sys.meta_path.insert(0, _BeforeMlx())


class _BeforeMlx(importlib.abc.MetaPathFinder):
    """Runs :func:`_give_mlx_openblas` when ``mlx`` is first imported, then steps aside (it finds nothing itself)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "mlx" and self in sys.meta_path:
            sys.meta_path.remove(self)
            _give_mlx_openblas()
        return None


def _give_mlx_openblas() -> None:
    wanted = os.environ.get(ENV_MLX_BLAS, "").strip()
    library = wanted or SYSTEM_OPENBLAS
    try:
        ctypes.CDLL(library)  # loaded, not yet global: is it there at all?
    except OSError as err:
        if wanted:
            _mlx_blas["error"] = f"{ENV_MLX_BLAS}={wanted!r}: cannot load it ({err})"
        _mlx_blas["how"] = "bundled"
        return
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        importlib.import_module("torch")  # before the OpenBLAS goes global, see load_mlx_blas
    ctypes.CDLL(library, mode=os.RTLD_GLOBAL)  # the same library, now in the global scope (never unloaded)
    _mlx_blas.update(how="loaded", library=library)
    _controller.cache_clear()  # a new pool: found by the next scan, and given the current count now
    _blas_controller.cache_clear()
    if _chosen:
        _blas_controller().limit(limits=_chosen["threads"])


def _preloaded() -> list[str]:
    return [Path(p).name for p in re.split(r"[\s:]+", os.environ.get("LD_PRELOAD", "")) if "blas" in p.lower()]


def mlx_blas() -> str:
    """The BLAS behind MLX's float32 CPU matmuls and convolutions, as reports record it (``versions.mlx_blas``)."""
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        import mlx
    except ImportError:
        return "unavailable"
    how = _mlx_blas.get("how")
    if how == "loaded" or how == "LD_PRELOAD":
        name = _mlx_blas.get("library") or _preloaded()[0]
        pool = _system_blas_pool()
        detail = f" {pool['version']} {pool['architecture']}" if pool else ""
        return f"{name}{detail} ({'loaded by parity before MLX' if how == 'loaded' else 'LD_PRELOAD'})"
    bundled = sorted(lib for root in mlx.__path__ for lib in Path(root).parent.glob("mlx_cpu.libs/libblas*"))
    if not bundled:
        return "system"
    note = _mlx_blas.get("note") or ("PARITY_MLX_BLAS=bundled" if os.environ.get(ENV_MLX_BLAS) == "bundled"
                                     else f"no {SYSTEM_OPENBLAS} found")
    return f"{bundled[0].name} (bundled netlib reference BLAS; {note})"


def mlx_blas_advice() -> str | None:
    """One line on how to make MLX's float32 GEMM fast on this machine, or None when it already is."""
    if sys.platform != "linux":
        return None
    how = _mlx_blas.get("how")
    if how == "LD_PRELOAD":
        return ("LD_PRELOAD of a BLAS also replaces PyTorch's own MKL in the reference; parity gives MLX the "
                "system OpenBLAS by itself: run without LD_PRELOAD")
    if how == "bundled" and os.environ.get(ENV_MLX_BLAS) != "bundled":
        slow = "MLX computes float32 matmuls with the wheel's reference BLAS (~30x slower)"
        if _mlx_blas.get("note"):
            return f"{slow}: MLX was imported before parity; import parity first"
        return f"{slow}: no system OpenBLAS ({SYSTEM_OPENBLAS}); `{INSTALL_HINT}` and parity uses it automatically"
    pool = _system_blas_pool()
    if pool and str(pool.get("architecture", "")).lower() in _PRE_AVX_KERNELS and "OPENBLAS_CORETYPE" not in os.environ:
        flags = _cpu_flags()
        if "avx2" in flags:
            coretype = "SkylakeX" if "avx512f" in flags else ("Zen" if "AMD" in _cpu_vendor() else "Haswell")
            return (f"OpenBLAS {pool['version']} does not know this CPU and runs its {pool['architecture']} kernels "
                    f"(several times slower): set OPENBLAS_CORETYPE={coretype} or install a newer OpenBLAS")
    return None


def advise_once(say: Callable[[str], None] | None = None) -> None:
    """Print :func:`mlx_blas_advice` once per process (to stderr, or through ``say``)."""
    advice = mlx_blas_advice()
    if advice and advice not in _said:
        _said.add(advice)
        (say or (lambda text: print(f"parity: {text}", file=sys.stderr)))(advice)


def _system_blas_pool() -> dict[str, Any] | None:
    """threadpoolctl's view of the BLAS MLX was given (not numpy's), or None."""
    name = _mlx_blas.get("library") or next(iter(_preloaded()), None)
    if not name:
        return None
    stem = Path(name).name.split(".so")[0]
    return next((p for p in _pools() if Path(p["filepath"] or "").name.startswith(stem)), None)


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def _cpu_vendor() -> str:
    return _cpuinfo("vendor_id")


@cache
def _cpuinfo(key: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# --- the record ---------------------------------------------------------------------------------

def current() -> dict[str, Any]:
    """The thread decision and the thread pools in use, for report metadata (``threads``)."""
    info: dict[str, Any] = {"available_cores": available_cores(), **_chosen}
    if sys.modules.get("torch") is not None:
        info["torch"] = sys.modules["torch"].get_num_threads()
    info["blas"] = _pools()
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "PARITY_"))}
    return info


def _pools() -> list[dict[str, Any]]:
    """Each pool's library, version, kernel and current thread count (no new scan: the pools found first)."""
    return [{k: pool.get(k) for k in ("internal_api", "num_threads", "version", "architecture", "filepath")}
            for pool in _controller().info()]
