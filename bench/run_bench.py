#!/usr/bin/env python
"""Benchmarks of the parity harness on this machine: run ``python bench/run_bench.py [--quick]``.

Not a test: it prints, in one run, ratios measured here, with the machine they were measured on.

1. Harness overhead, per registered component: the capture-and-compare part of a run
   (``run_component(analyses=False)``: report and dumps written, no float64 truth, no extra
   runs) / the same work done by a plain script (build both models, one reference forward, one
   MLX forward); goal <= 1.15 where the forwards dominate. The difference is the per-run fixed
   cost (goal <= 50 ms). Then the extra analyses (drift, float64 truth) on their own, and the
   whole ``parity run`` in memory and streaming.
2. MLX implementation / torch reference forward wall time, per component. Goal <= 1.0.
3. Metric throughput (``parity.metrics.tensor_metrics``) in GB/s of float32 pairs, against a
   plain numpy pass over the same data (``np.abs(b - a).max()``). Goal >= 2 GB/s, and within 2x
   of the numpy pass.
4. Peak RSS of a 40-layer capture with and without streaming (and 10 layers, to show it is flat
   in layer count), each in its own subprocess.
5. ``--full``: full-size configs (Wan-14B block, real Wan VAE encoder dims at modest resolution):
   wall time and peak RSS of a streaming run in a subprocess. Missing components or configs are
   skipped with a message; more with ``--full-config COMPONENT=CONFIG.json``.
6. ``--attention``: peak memory of the attention-map computations at the Wan-14B block's heads
   (40 x 128) for its token count (``fixtures/configs/block_14b.json``) and larger ones: the
   reference's and our probabilities and the per-head metrics, each in a subprocess, beyond the
   inputs and the map itself (goal: flat in token count).

Threads follow the harness's policy (:mod:`parity.threads`; ``--threads N`` overrides it), and
MLX gets the BLAS the harness gives it. ``--contended`` runs everything next to a CPU-bound
neighbour process (started and stopped by the bench, bounded in time), so a thread policy that
breaks on a shared machine shows. The header records the CPU, the ``OPENBLAS_*`` variables and
the BLAS kernels threadpoolctl reports.

Options: ``--components a,b`` (default: every registered one), ``--quick`` (smaller data, fewer
repetitions), ``--dtype``, ``--repeat N``, ``--threads N``, ``--contended``, ``--json FILE``
(all numbers, machine-readable).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from parity import threads  # noqa: E402 - first: parity gives MLX the system OpenBLAS before anything imports MLX

#: Full-size runs: component -> config file (relative to the repository). Missing ones are skipped.
FULL_CONFIGS = {
    "block": "fixtures/configs/block_14b.json",
    "vae": "fixtures/configs/vae_full.json",
}
MEMORY_LIMIT_GB = 24
#: The neighbour of ``--contended`` stops by itself after this long, or when the bench is gone.
NEIGHBOUR_SECONDS = 4 * 3600
#: Token counts of the attention-map measurement: the Wan-14B block fixture's (192), then larger.
ATTENTION_TOKENS = [192, 768, 2048, 3072]


# --- machine ----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    from parity.runner import versions

    info = threads.current()
    mem = _proc_field("/proc/meminfo", "MemTotal")
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
            "memory_gb": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
            "versions": {k: v for k, v in versions().items() if k != "platform"}, "platform": platform.platform(),
            "threads": {"available_cores": info["available_cores"], "requested": threads.requested()},
            "blas": [{k: pool[k] for k in ("version", "architecture", "num_threads")} | {"file": Path(pool["filepath"]).name}
                     for pool in info["blas"] if pool["internal_api"] in ("openblas", "mkl", "blis")],
            "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@contextmanager
def neighbour(active: bool) -> Iterator[int | None]:
    """A CPU-bound process spinning next to the bench (``active``), stopped on exit; yields its pid."""
    if not active:
        yield None
        return
    code = ("import os, time\n"
            f"parent, end = os.getppid(), time.monotonic() + {NEIGHBOUR_SECONDS}\n"
            "while time.monotonic() < end and os.getppid() == parent:  # also stops if the bench dies\n"
            "    for _ in range(1_000_000): pass\n")
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield process.pid
    finally:
        process.terminate()
        process.wait()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``repeat`` calls (after one untimed warm-up call)."""
    return timed_cpu(fn, repeat)[0]


def timed_cpu(fn: Callable[[], Any], repeat: int, warm_up: bool = True) -> tuple[float, float]:
    """Median wall time and median CPU time (this process, all its threads) of ``repeat`` calls, after a warm-up call unless ``warm_up`` is False.

    On a shared machine the wall time is what one waits; the CPU time is the work done, which
    neighbours barely change (a pool spinning against them still shows: spinning burns CPU).
    """
    if warm_up:
        fn()
    walls, cpus = [], []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


# --- 1 + 2: harness overhead and MLX / torch --------------------------------------------------

class _Discard:
    """A capture that keeps nothing; MLX tensors are evaluated (as a caller of the model would)."""

    def __init__(self) -> None:
        from parity.capture import Capture

        class Discard(Capture):
            def add(self, name: str, tensor: Any, dtype: str | None = None) -> None:
                if type(tensor).__module__.startswith("mlx"):
                    import mlx.core as mx

                    mx.eval(tensor)

        self.capture = Discard


def plain_forwards(comp: Any, dtype: str, repeat: int) -> dict[str, Any]:
    """What a plain script pays for the calls a run makes: build both models, then each side's forward on
    the inputs, and again on the second call's when the run makes one ((wall, CPU) each)."""
    import torch

    from parity.runner import second_call_skipped

    config = comp.load_config()
    discard = _Discard().capture

    def setup():
        reference = comp.build_reference(config, 0)
        weights = comp.reference_weights(reference)
        return (reference, comp.build_mlx(config, comp.convert_weights(weights), dtype), comp.run_hooks(weights)[0],
                comp.make_inputs(config, 0))

    reference, mlx_model, hooks, inputs = setup()
    count = threads.apply(parameters=sum(v.size for v in comp.reference_weights(reference).values()))  # as a run would
    cast = comp.cast_reference(reference, dtype)
    calls = [inputs]
    if second_call_skipped(SimpleNamespace(component=comp, dtype=dtype), streaming=False, crashed=False) is None:
        calls.append(comp.second_inputs(config, 0))

    def ref_forward():
        with torch.no_grad():
            for call in calls:
                comp.run_reference(cast, call, dtype, discard("ref"))

    def mlx_forward():
        for call in calls:
            with comp.mlx_capture(mlx_model, discard("mlx"), hooks):
                comp.run_mlx(mlx_model, call, dtype)

    def script():
        setup()
        ref_forward()
        mlx_forward()

    return {"setup": timed_cpu(setup, repeat), "ref": timed_cpu(ref_forward, repeat),
            "mlx": timed_cpu(mlx_forward, repeat), "threads": count, "calls": len(calls), "script": script}


def harness_runs(name: Any, dtype: str, repeat: int, script: Callable[[], None]
                 ) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """``run_component`` as ``parity run`` calls it (report and dumps written): capture-and-compare only,
    the same writing no tensor file (``--keep-tensors none``), whole, streaming; each repetition runs the
    plain ``script`` and then each of them, so a machine that slows down or speeds up between repetitions
    shifts both sides of each ratio alike. (wall, CPU) per repetition each; and how many tensor files a run writes."""
    from parity.runner import run_component

    kinds = {"plain": None, "core": {"analyses": False}, "core_no_files": {"analyses": False, "keep_tensors": "none"},
             "run": {}, "run_streaming": {"streaming": True}}
    out: dict[str, list[tuple[float, float]]] = {label: [] for label in kinds}
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        runs = {label: (script if kwargs is None else
                        partial(run_component, name, dtype, out_dir=Path(tmp) / label, **kwargs))
                for label, kwargs in kinds.items()}
        for run in runs.values():  # warm-up
            run()
        for _ in range(repeat):
            for label, run in runs.items():
                out[label].append(timed_cpu(run, 1, warm_up=False))
        files = sum(1 for _ in (Path(tmp) / "core").rglob("*.npy")) // (repeat + 1)  # it ran repeat + 1 times
    return out, files


def _paired(runs: dict[str, list[tuple[float, float]]], label: str, against: str, how: Callable[[float, float], float],
            cpu: bool = False) -> float:
    """The median over repetitions of ``how(label's time, against's time)`` (wall, or CPU time)."""
    return statistics.median(how(a[cpu], b[cpu]) for a, b in zip(runs[label], runs[against]))


def bench_components(components: list[Any], dtype: str, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for comp in components:
        label = comp.name if comp.name != "bench_stack" else f"bench_stack: {comp.description}"
        print(f"  component {label} ({dtype}) ...", file=sys.stderr, flush=True)
        try:
            plain = plain_forwards(comp, dtype, repeat)
            runs, files = harness_runs(comp, dtype, repeat, plain.pop("script"))
        except Exception as err:  # noqa: BLE001 - one broken component must not stop the bench
            rows.append({"component": label, "dtype": dtype, "error": f"{type(err).__name__}: {err}"})
            continue
        count, calls = plain.pop("threads"), plain.pop("calls")
        medians = {**plain, **{k: tuple(statistics.median(t[i] for t in v) for i in (0, 1)) for k, v in runs.items()}}
        wall = {k: v[0] for k, v in medians.items()}
        cpu = {k: v[1] for k, v in medians.items()}
        ratio, ms = (lambda a, b: a / b), (lambda a, b: 1e3 * (a - b))
        rows.append({
            "component": label, "dtype": dtype, "threads": count, "calls": calls, "tensor_files": files,
            **{f"t_{k}": v for k, v in wall.items()}, **{f"cpu_{k}": v for k, v in cpu.items()},
            "overhead": _paired(runs, "core", "plain", ratio), "fixed_ms": _paired(runs, "core", "plain", ms),
            "overhead_cpu": _paired(runs, "core", "plain", ratio, cpu=True),
            "fixed_ms_cpu": _paired(runs, "core", "plain", ms, cpu=True),
            "fixed_ms_no_files": _paired(runs, "core_no_files", "plain", ms),
            "t_analyses": _paired(runs, "run", "core", lambda a, b: a - b),
            "overhead_run": _paired(runs, "run", "plain", ratio),
            "overhead_streaming": _paired(runs, "run_streaming", "plain", ratio), "mlx_over_torch": wall["mlx"] / wall["ref"],
        })
    return rows


# --- 3: metric throughput ---------------------------------------------------------------------

def bench_metrics(numel: int, repeat: int) -> dict[str, Any]:
    from parity.metrics import precision_budget, tensor_metrics

    rng = np.random.default_rng(0)
    a = rng.standard_normal(numel, dtype=np.float32)
    b = a + np.float32(1e-4) * rng.standard_normal(numel, dtype=np.float32)
    gb = 2 * a.nbytes / 1e9
    t_metrics, cpu_metrics = timed_cpu(lambda: tensor_metrics(a, b), repeat)
    t_numpy, cpu_numpy = timed_cpu(lambda: float(np.abs(b - a).max()), repeat)
    truth = a.astype(np.float64)
    t_budget = timed(lambda: precision_budget(truth, a, b), repeat)
    return {
        "numel": numel, "pair_gb": gb,
        "metrics_gbps": gb / t_metrics, "numpy_gbps": gb / t_numpy, "metrics_over_numpy": t_metrics / t_numpy,
        "metrics_gbps_cpu": gb / cpu_metrics, "numpy_gbps_cpu": gb / cpu_numpy,
        "budget_gbps": (truth.nbytes + 2 * a.nbytes) / 1e9 / t_budget,
    }


def bench_policy(repeat: int) -> dict[str, Any]:
    """The thread policy against the pools' defaults (every available core), as ratios in one run: the
    issue-17 cases (a metric pass whose BLAS dots spin on two threads; a small torch Linear)."""
    import torch
    from threadpoolctl import threadpool_limits

    from parity.metrics import tensor_metrics

    cores = threads.available_cores()
    rng = np.random.default_rng(1)
    a = rng.standard_normal(2_000_000, dtype=np.float32)
    b = a + np.float32(1e-4) * a
    linear, x = torch.nn.Linear(256, 1024), torch.randn(192, 256)
    before = torch.get_num_threads()

    def forward():
        with torch.no_grad():
            linear(x)
    try:
        with threadpool_limits(limits=cores, user_api="blas"):
            metrics_cores = timed(lambda: tensor_metrics.__wrapped__(a, b), repeat)  # without its one-thread BLAS
            metrics_one = timed(lambda: tensor_metrics(a, b), repeat)
        torch.set_num_threads(cores)
        linear_cores = timed(forward, 10 * repeat)
        torch.set_num_threads(1)
        linear_one = timed(forward, 10 * repeat)
    finally:
        torch.set_num_threads(before)
    return {"cores": cores, "metrics_cores_s": metrics_cores, "metrics_one_s": metrics_one,
            "linear_cores_ms": 1e3 * linear_cores, "linear_one_ms": 1e3 * linear_one}


# --- 4: peak RSS of a deep capture ------------------------------------------------------------

def stack_component(layers: int, tokens: int, width: int, kind: str = "linear"):
    """A synthetic component: ``layers`` x (layer + tanh), each layer output captured on both sides.

    ``kind="linear"``: Linear(width, width), a transformer-like amount of compute per captured
    byte. ``kind="affine"``: a per-channel scale and shift, so nearly all the cost is the capture
    itself and the weights are negligible (the peak-RSS benchmark).
    """
    import mlx.core as mx
    import mlx.nn as mnn
    import torch

    from fixtures.inputs import normal
    from mlx_impl.taps import tap
    from parity.capture_torch import hook_modules
    from parity.component import Component
    from parity.config import ComponentConfig
    from parity.weights import strict_load

    class StackConfig(ComponentConfig):
        layers: int
        tokens: int
        width: int
        kind: str

    class TorchAffine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(1.0 + 0.1 * torch.randn(width))
            self.bias = torch.nn.Parameter(0.1 * torch.randn(width))

        def forward(self, x):
            return x * self.weight + self.bias

    class MlxAffine(mnn.Module):
        def __init__(self):
            super().__init__()
            self.weight = mx.ones((width,))
            self.bias = mx.zeros((width,))

        def __call__(self, x):
            return x * self.weight + self.bias

    def torch_layer():
        return torch.nn.Linear(width, width) if kind == "linear" else TorchAffine()

    class MlxStack(mnn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [mnn.Linear(width, width) if kind == "linear" else MlxAffine() for _ in range(layers)]

    class Stack(Component):
        name = "bench_stack"
        description = f"{layers} x ({kind}({width}) + tanh) on {tokens} tokens"
        config_model = StackConfig

        def load_config(self, path=None, overrides=None):
            return StackConfig(layers=layers, tokens=tokens, width=width, kind=kind)

        def make_inputs(self, config, seed):
            return {"x": normal(seed, "bench/x", (tokens, width))}

        def build_reference(self, config, seed):
            torch.manual_seed(seed)
            return torch.nn.ModuleDict({"layers": torch.nn.ModuleList(torch_layer() for _ in range(layers))})

        def run_reference(self, reference, inputs, dtype, capture):
            x = torch.from_numpy(inputs["x"]).to(getattr(torch, dtype))
            with hook_modules(reference, capture, {"layers.*": "layer{0}"}):
                for layer in reference["layers"]:
                    x = torch.tanh(layer(x))

        def build_mlx(self, config, weights, dtype):
            model = MlxStack()
            strict_load(model, weights, dtype=getattr(mx, dtype))
            return model

        def run_mlx(self, model, inputs, dtype):
            x = mx.array(inputs["x"]).astype(getattr(mx, dtype))
            for i, layer in enumerate(model.layers):
                x = mx.tanh(tap(f"layer{i}", layer(x)))
            mx.eval(x)

    return Stack()


def rss_child(mode: str, layers: int, tokens: int, width: int) -> dict[str, Any]:
    """In a subprocess: peak RSS of one run of the stack component (after a tiny warm-up)."""
    threads.configure()
    from parity.runner import run_component

    run_component(stack_component(2, 8, 8, "affine"), out_dir=None)  # imports, allocator warm-up
    reset = reset_peak_rss()
    start = time.perf_counter()
    result = run_component(stack_component(layers, tokens, width, "affine"), out_dir=None,
                           streaming=(mode == "streaming"))
    return {"mode": mode, "layers": layers, "peak_rss_mb": peak_rss_mb(), "peak_reset": reset,
            "seconds": time.perf_counter() - start, "verdict": result.verdict,
            "tensor_mb": tokens * width * 4 / 2**20}


def _child(args: list[str], timeout: float = 3600) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_rss(layer_counts: list[int], tokens: int, width: int) -> list[dict[str, Any]]:
    rows = []
    for layers in layer_counts:
        for mode in ("in-memory", "streaming"):
            print(f"  {layers}-layer capture, {mode} ...", file=sys.stderr, flush=True)
            rows.append({"mode": mode, "layers": layers,
                         **_child(["--_rss-child", mode, str(layers), str(tokens), str(width)])})
    return rows


# --- 5: full-size runs ------------------------------------------------------------------------

def full_child(name: str, config: str, dtype: str) -> dict[str, Any]:
    from parity.runner import run_component

    reset_peak_rss()
    start = time.perf_counter()
    result = run_component(name, dtype, out_dir=None, config_path=config, streaming=True)
    return {"component": name, "config": config, "dtype": dtype, "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(), "verdict": result.verdict, "layers": len(result.layers)}


def bench_full(configs: dict[str, str], dtype: str) -> list[dict[str, Any]]:
    from parity import registry

    rows = []
    for name, config in configs.items():
        path = REPO / config if not Path(config).is_absolute() else Path(config)
        if name not in registry.available():
            print(f"  full-size {name}: skipped, component {name!r} is not registered", file=sys.stderr)
            rows.append({"component": name, "config": config, "skipped": "component not registered"})
            continue
        if not path.is_file():
            print(f"  full-size {name}: skipped, config {config} does not exist", file=sys.stderr)
            rows.append({"component": name, "config": config, "skipped": "config missing"})
            continue
        print(f"  full-size {name} ({config}) ...", file=sys.stderr, flush=True)
        rows.append({"component": name, "config": config,
                     **_child(["--_full-child", name, str(path), dtype], timeout=6 * 3600)})
    return rows


# --- 6: attention maps -----------------------------------------------------------------------

#: Wan-14B self-attention: heads x head_dim (dim 5120).
ATTENTION_HEADS, ATTENTION_HEAD_DIM = 40, 128


def attention_child(what: str, tokens: int) -> dict[str, Any]:
    """In a subprocess: peak RSS of one attention-map computation beyond its inputs and its output map."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (1, tokens, ATTENTION_HEADS, ATTENTION_HEAD_DIM)
    map_mb = ATTENTION_HEADS * tokens * tokens * 4 / 2**20
    scale = ATTENTION_HEAD_DIM ** -0.5
    if what == "reference":
        import torch

        from reference_runners.attention import dispatch_probs

        torch.set_num_threads(1)
        q, k = (torch.from_numpy(rng.standard_normal(shape, np.float32)) for _ in range(2))
        run = lambda: dispatch_probs({"query": q, "key": k, "scale": scale})  # noqa: E731
    elif what == "mlx":
        import mlx.core as mx

        from mlx_impl.block import attention_probs

        q, k = (mx.array(rng.standard_normal(shape, np.float32)).transpose(0, 2, 1, 3) for _ in range(2))
        mx.eval(q, k)
        run = lambda: attention_probs(q, k, scale)  # noqa: E731
    else:
        from parity.attention import head_metrics

        ref = rng.random((1, ATTENTION_HEADS, tokens, tokens), np.float32)
        ref /= ref.sum(-1, keepdims=True)
        ours = ref + np.float32(1e-6)
        run = lambda: head_metrics(ref, ours, {"history": (0, tokens // 3)})  # noqa: E731
    reset = reset_peak_rss()
    before = current_rss_mb() if reset else peak_rss_mb()
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    kept = map_mb if what != "metrics" else 0.0
    del out
    return {"what": what, "tokens": tokens, "map_mb": map_mb, "peak_over_inputs_mb": peak_rss_mb() - before,
            "work_mb": peak_rss_mb() - before - kept, "seconds": seconds, "peak_reset": reset}


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_attention(token_counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for tokens in token_counts:
        for what in ("reference", "mlx", "metrics"):
            print(f"  attention maps: {what}, {tokens} tokens ...", file=sys.stderr, flush=True)
            rows.append({"what": what, "tokens": tokens, **_child(["--_attn-child", what, str(tokens)])})
    return rows


# --- report -----------------------------------------------------------------------------------

def _f(value: Any, fmt: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def render_attention(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"## Attention maps ({ATTENTION_HEADS} heads x {ATTENTION_HEAD_DIM}, batch 1; subprocess each)", "",
             "| computation | tokens | map MB | peak RSS over inputs MB | work MB (beyond the map) | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['what']} | {r['tokens']} | error: {r['error']} ||||")
        else:
            lines.append(f"| {r['what']} | {r['tokens']} | {r['map_mb']:.1f} | {r['peak_over_inputs_mb']:.1f} | "
                         f"{r['work_mb']:.1f} | {_f(r['seconds'])} |")
    return lines


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    v, t = m["versions"], m["threads"]
    blas = "; ".join(f"{b['file']} {b['version']} {b['architecture']} x{b['num_threads']}" for b in m["blas"])
    env = ", ".join(f"{k}={val}" for k, val in m["openblas_env"].items()) or "none set"
    load = ", ".join(f"{x:.1f}" for x in m["load_average"]) if m.get("load_average") else "-"
    neighbour = (f"**contended**: a CPU-bound neighbour process (pid {results['neighbour']}) ran throughout"
                 if results.get("neighbour") else "no neighbour started by the bench")
    policy = (f"{t['requested'][0]} ({t['requested'][1]})" if t["requested"] else
              f"per run: 1 for a reference under {threads.SMALL_REFERENCE:,} parameters, else the {t['available_cores']} available")
    lines = [f"# parity harness benchmarks, {m['date']}",
             f"machine: {m['cpu']}, {m['nproc']} cores (nproc), {m['memory_gb']} GB RAM, load average at start {load}; "
             f"{neighbour}",
             f"threads: {policy}; BLAS pools (threadpoolctl): {blas}; OPENBLAS_*: {env}",
             f"torch {v.get('torch')}, mlx {v.get('mlx')}, numpy {v.get('numpy')}, python {v.get('python')}; "
             f"MLX BLAS: {v.get('mlx_blas')}; mode: {'quick' if results['quick'] else 'default'}, "
             f"median of {results['repeat']}", ""]
    lines += ["## Components (median of wall time, or of CPU time where said; plain = build both models + "
              "each side's forward for each call the run makes)", "",
              "| component | dtype | threads | calls | ref fwd s | MLX fwd s | MLX / torch (goal <= 1.0) | plain script s | "
              "capture+compare s | overhead (goal <= 1.15) | overhead, CPU time | fixed cost ms (goal <= 50) | "
              "fixed cost ms, CPU time | tensor files | fixed cost ms, no tensor files | extra analyses s | parity run s | "
              "streaming run s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["components"]:
        if "error" in r:
            lines.append(f"| {r['component']} | {r['dtype']} | error: {r['error']} ||||||||||||||||")
            continue
        lines.append(f"| {r['component']} | {r['dtype']} | {r['threads']} | {r['calls']} | {_f(r['t_ref'])} | {_f(r['t_mlx'])} | {_f(r['mlx_over_torch'], '.2f')} | "
                     f"{_f(r['t_plain'])} | {_f(r['t_core'])} | {_f(r['overhead'], '.2f')} | {_f(r['overhead_cpu'], '.2f')} | "
                     f"{_f(r['fixed_ms'], '.0f')} | {_f(r['fixed_ms_cpu'], '.0f')} | {r['tensor_files']} | "
                     f"{_f(r['fixed_ms_no_files'], '.0f')} | "
                     f"{_f(r['t_analyses'])} | {_f(r['t_run'])} | {_f(r['t_run_streaming'])} |")
    mt = results["metrics"]
    lines += ["", "## Metrics (float32 pairs, one pass, float64 accumulation, BLAS on one thread)", "",
              "| elements | data GB | tensor_metrics GB/s (goal >= 2) | numpy abs(b-a).max GB/s | metrics / numpy time (goal <= 2) | "
              "tensor_metrics / numpy GB/s, CPU time | precision_budget GB/s (f64 truth + 2 f32) |",
              "|---|---|---|---|---|---|---|",
              f"| {mt['numel']:,} | {_f(mt['pair_gb'])} | {_f(mt['metrics_gbps'], '.2f')} | {_f(mt['numpy_gbps'], '.2f')} | "
              f"{_f(mt['metrics_over_numpy'], '.2f')} | {_f(mt['metrics_gbps_cpu'], '.2f')} / {_f(mt['numpy_gbps_cpu'], '.2f')} | "
              f"{_f(mt['budget_gbps'], '.2f')} |"]
    if results.get("policy"):
        p = results["policy"]
        lines += ["", f"## Thread policy vs the pools' default ({p['cores']} threads), median wall time", "",
                  "| case | default s | policy (1 thread) s | default / policy |", "|---|---|---|---|",
                  f"| tensor_metrics, 2M float32 pairs (BLAS dots) | {_f(p['metrics_cores_s'])} | {_f(p['metrics_one_s'])} | "
                  f"{_f(p['metrics_cores_s'] / p['metrics_one_s'], '.2f')} |",
                  f"| torch Linear(256, 1024) on 192 tokens | {_f(p['linear_cores_ms'] / 1e3)} | {_f(p['linear_one_ms'] / 1e3)} | "
                  f"{_f(p['linear_cores_ms'] / p['linear_one_ms'], '.2f')} |"]
    if results.get("rss"):
        lines += ["", "## Peak RSS of a deep capture (subprocess each; per-channel affine + tanh stack, "
                      f"{_f(results['rss_tensor_mb'])} MB per captured tensor)", "",
                  "| layers | mode | peak RSS MB | wall s | verdict |", "|---|---|---|---|---|"]
        for r in results["rss"]:
            if "error" in r:
                lines.append(f"| {r['layers']} | {r['mode']} | error: {r['error']} |||")
            else:
                lines.append(f"| {r['layers']} | {r['mode']} | {r['peak_rss_mb']:.0f} | {_f(r['seconds'])} | {r['verdict']} |")
    if results.get("full") is not None:
        lines += ["", f"## Full-size runs (streaming, {results['dtype']}, subprocess each; limit {MEMORY_LIMIT_GB} GB)", "",
                  "| component | config | wall s | peak RSS GB | layers | verdict |", "|---|---|---|---|---|---|"]
        for r in results["full"]:
            if "skipped" in r or "error" in r:
                lines.append(f"| {r['component']} | {r['config']} | {r.get('skipped') or 'error: ' + r['error']} ||||")
            else:
                lines.append(f"| {r['component']} | {r['config']} | {_f(r['seconds'])} | {r['peak_rss_mb'] / 1024:.2f} | "
                             f"{r['layers']} | {r['verdict']} |")
    if results.get("attention"):
        lines += ["", *render_attention(results["attention"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_rss-child"]:
        mode, layers, tokens, width = argv[1], *map(int, argv[2:5])
        print(json.dumps(rss_child(mode, layers, tokens, width)))
        return 0
    if argv[:1] == ["--_full-child"]:
        threads.configure()
        print(json.dumps(full_child(argv[1], argv[2], argv[3])))
        return 0
    if argv[:1] == ["--_attn-child"]:
        print(json.dumps(attention_child(argv[1], int(argv[2]))))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", help="comma-separated components (default: every registered one)")
    parser.add_argument("--quick", action="store_true", help="small data, 3 repetitions")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, help="timed repetitions per measurement (median; default 5, quick 3)")
    parser.add_argument("--threads", help="thread count (default: the harness's policy, or PARITY_THREADS)")
    parser.add_argument("--contended", action="store_true",
                        help="run every measurement next to a CPU-bound neighbour process")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-stack", action="store_true", help="skip the synthetic Linear-stack component")
    parser.add_argument("--full", action="store_true", help="also run the full-size configs (slow, GBs of memory)")
    parser.add_argument("--full-config", action="append", default=[], metavar="COMPONENT=CONFIG",
                        help="add or replace a full-size config (repeatable)")
    parser.add_argument("--attention", action="store_true",
                        help="also measure the attention-map computations' memory (Wan-14B heads; 192 to 3072 tokens)")
    parser.add_argument("--attention-only", action="store_true", help="only that measurement")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    configs = dict(FULL_CONFIGS)
    for item in args.full_config:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--full-config expects COMPONENT=CONFIG, got {item!r}")
        configs[name] = path

    importlib.import_module("mlx.core")  # now (after torch, see parity.threads): the header names the BLAS it binds to
    from parity import registry
    from parity.vocab import InputError

    try:
        threads.configure(args.threads)
    except InputError as err:
        parser.error(str(err))
    if args.threads:  # the subprocesses (peak RSS, full size) follow the same count
        os.environ[threads.ENV_THREADS] = args.threads
    threads.advise_once()
    names = args.components.split(",") if args.components else registry.available()
    repeat = args.repeat or (3 if args.quick else 5)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "dtype": args.dtype, "repeat": repeat}
    print("benchmarking ...", file=sys.stderr)
    if args.attention_only:
        print("\n".join(render_attention(bench_attention(ATTENTION_TOKENS))))
        return 0
    with neighbour(args.contended) as pid:
        results["neighbour"] = pid
        if args.attention:
            results["attention"] = bench_attention(ATTENTION_TOKENS)
        components = [registry.get(name) for name in names]
        if not args.no_stack:  # a workload big enough for the per-run fixed costs not to dominate
            components.append(stack_component(8, 1024, 512) if args.quick else stack_component(8, 2048, 1024))
        results["components"] = bench_components(components, args.dtype, repeat)
        results["metrics"] = bench_metrics(8_000_000 if args.quick else 64_000_000, repeat)
        results["policy"] = bench_policy(repeat)
        if not args.no_rss:
            tokens, width = (16384, 128) if args.quick else (65536, 128)
            results["rss_tensor_mb"] = tokens * width * 4 / 2**20
            results["rss"] = bench_rss([10, 40], tokens, width)
        if args.full:
            results["full"] = bench_full(configs, args.dtype)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
