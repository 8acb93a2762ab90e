#!/usr/bin/env python
"""Benchmarks of the parity harness on this machine: run ``python bench/run_bench.py [--quick]``.

Not a test: it prints, in one run, ratios measured here, with the machine they were measured on.

1. Harness overhead, per registered component: ``parity run`` wall time (in memory, and
   streaming) / the same work done by a plain script (build both models, one reference forward,
   one MLX forward). Goal <= 1.15.
2. MLX implementation / torch reference forward wall time, per component. Goal <= 1.0.
3. Metric throughput (``parity.metrics.tensor_metrics``) in GB/s of float32 pairs, against a
   plain numpy pass over the same data (``np.abs(b - a).max()``). Goal >= 2 GB/s.
4. Peak RSS of a 40-layer capture with and without streaming (and 10 layers, to show it is flat
   in layer count), each in its own subprocess.
5. ``--full``: full-size configs (Wan-14B block, real Wan VAE encoder dims at modest resolution):
   wall time and peak RSS of a streaming run in a subprocess. Missing components or configs are
   skipped with a message; more with ``--full-config COMPONENT=CONFIG.json``.
6. ``--attention``: peak memory of the attention-map computations at the Wan-14B block's heads
   (40 x 128) for its token count (``fixtures/configs/block_14b.json``) and larger ones: the
   reference's and our probabilities and the per-head metrics, each in a subprocess, beyond the
   inputs and the map itself (goal: flat in token count).

Options: ``--components a,b`` (default: every registered one), ``--quick`` (smaller data, one
repetition), ``--dtype``, ``--repeat N``, ``--json FILE`` (all numbers, machine-readable).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Full-size runs: component -> config file (relative to the repository). Missing ones are skipped.
FULL_CONFIGS = {
    "block": "fixtures/configs/block_14b.json",
    "vae": "fixtures/configs/vae_full.json",
}
MEMORY_LIMIT_GB = 24
#: Token counts of the attention-map measurement: the Wan-14B block fixture's (192), then larger.
ATTENTION_TOKENS = [192, 768, 2048, 3072]


# --- machine ----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    from parity.runner import versions

    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "nproc": os.cpu_count(), "cpu": cpu,
            "memory_gb": mem, "versions": {k: v for k, v in versions().items() if k != "platform"},
            "platform": platform.platform()}


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
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- 1 + 2: harness overhead and MLX / torch --------------------------------------------------

class _Discard:
    """A capture that keeps nothing; MLX tensors are evaluated (as a caller of the model would)."""

    def add(self, name: str, x: Any) -> None:
        if type(x).__module__.startswith("mlx"):
            import mlx.core as mx

            mx.eval(x)


def plain_forwards(comp: Any, dtype: str, repeat: int) -> dict[str, float]:
    """What a plain script pays: build both models, one reference forward, one MLX forward."""
    import torch

    config = comp.load_config()

    def setup():
        reference = comp.build_reference(config, 0)
        weights = comp.reference_weights(reference)
        return reference, comp.build_mlx(config, weights, dtype), comp.make_inputs(config, 0)

    t_setup = timed(setup, repeat)
    reference, mlx_model, inputs = setup()
    cast = comp.cast_reference(reference, dtype)

    def ref_forward():
        with torch.no_grad():
            comp.run_reference(cast, inputs, dtype, _Discard())

    def mlx_forward():
        comp.run_mlx(mlx_model, inputs, dtype, _Discard())

    return {"setup": t_setup, "ref": timed(ref_forward, repeat), "mlx": timed(mlx_forward, repeat)}


def harness_runs(name: Any, dtype: str, repeat: int) -> dict[str, float]:
    from parity.runner import run_component

    out = {}
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        for label, kwargs in (("run", {}), ("run_streaming", {"streaming": True})):
            out[label] = timed(lambda: run_component(name, dtype, out_dir=tmp, **kwargs), repeat)
    return out


def bench_components(components: list[Any], dtype: str, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for comp in components:
        label = comp.name if comp.name != "bench_stack" else f"bench_stack: {comp.description}"
        print(f"  component {label} ({dtype}) ...", file=sys.stderr, flush=True)
        try:
            plain = plain_forwards(comp, dtype, repeat)
            runs = harness_runs(comp, dtype, repeat)
        except Exception as err:  # noqa: BLE001 - one broken component must not stop the bench
            rows.append({"component": label, "dtype": dtype, "error": f"{type(err).__name__}: {err}"})
            continue
        baseline = plain["setup"] + plain["ref"] + plain["mlx"]
        rows.append({
            "component": label, "dtype": dtype, **{f"t_{k}": v for k, v in {**plain, **runs}.items()},
            "overhead": runs["run"] / baseline, "overhead_streaming": runs["run_streaming"] / baseline,
            "mlx_over_torch": plain["mlx"] / plain["ref"],
        })
    return rows


# --- 3: metric throughput ---------------------------------------------------------------------

def bench_metrics(numel: int, repeat: int) -> dict[str, Any]:
    from parity.metrics import precision_budget, tensor_metrics

    rng = np.random.default_rng(0)
    a = rng.standard_normal(numel, dtype=np.float32)
    b = a + np.float32(1e-4) * rng.standard_normal(numel, dtype=np.float32)
    gb = 2 * a.nbytes / 1e9
    t_metrics = timed(lambda: tensor_metrics(a, b), repeat)
    t_numpy = timed(lambda: float(np.abs(b - a).max()), repeat)
    truth = a.astype(np.float64)
    t_budget = timed(lambda: precision_budget(truth, a, b), repeat)
    return {
        "numel": numel, "pair_gb": gb,
        "metrics_gbps": gb / t_metrics, "numpy_gbps": gb / t_numpy, "metrics_over_numpy": t_metrics / t_numpy,
        "budget_gbps": (truth.nbytes + 2 * a.nbytes) / 1e9 / t_budget,
    }


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
    from parity.capture import capture_mlx, capture_torch
    from parity.component import Component
    from parity.weights import strict_load

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

        def load_config(self, path=None):
            return {"layers": layers, "tokens": tokens, "width": width, "kind": kind}

        def make_inputs(self, config, seed):
            return {"x": normal(seed, "bench/x", (tokens, width))}

        def build_reference(self, config, seed):
            torch.manual_seed(seed)
            return torch.nn.ModuleDict({"layers": torch.nn.ModuleList(torch_layer() for _ in range(layers))})

        def run_reference(self, reference, inputs, dtype, capture):
            hooks = {f"layers.{i}": f"layer{i:02d}" for i in range(layers)}
            x = torch.from_numpy(inputs["x"]).to(getattr(torch, dtype))
            with capture_torch(reference, capture, hooks):
                for layer in reference["layers"]:
                    x = torch.tanh(layer(x))

        def build_mlx(self, config, weights, dtype):
            model = MlxStack()
            strict_load(model, weights, dtype=getattr(mx, dtype))
            return model

        def run_mlx(self, model, inputs, dtype, capture):
            from mlx_impl.taps import tap

            x = mx.array(inputs["x"]).astype(getattr(mx, dtype))
            with capture_mlx(capture):
                for i, layer in enumerate(model.layers):
                    x = mx.tanh(tap(f"layer{i:02d}", layer(x)))

    return Stack()


def rss_child(mode: str, layers: int, tokens: int, width: int) -> dict[str, Any]:
    """In a subprocess: peak RSS of one run of the stack component (after a tiny warm-up)."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
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
    lines = [f"# parity harness benchmarks, {m['date']}",
             f"machine: {m['cpu']}, {m['nproc']} cores (nproc), {m['memory_gb']} GB RAM; "
             f"torch {m['versions'].get('torch')}, mlx {m['versions'].get('mlx')}, numpy {m['versions'].get('numpy')}, "
             f"python {m['versions'].get('python')}; MLX BLAS: {m['versions'].get('mlx_blas')}; "
             f"mode: {'quick' if results['quick'] else 'default'}", ""]
    lines += ["## Components (median wall time; plain = build both models + one forward each)", "",
              "| component | dtype | ref fwd s | MLX fwd s | MLX / torch (goal <= 1.0) | plain script s | "
              "parity run s | overhead (goal <= 1.15) | streaming run s | overhead streaming |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["components"]:
        if "error" in r:
            lines.append(f"| {r['component']} | {r['dtype']} | error: {r['error']} |||||||")
            continue
        plain = r["t_setup"] + r["t_ref"] + r["t_mlx"]
        lines.append(f"| {r['component']} | {r['dtype']} | {_f(r['t_ref'])} | {_f(r['t_mlx'])} | {_f(r['mlx_over_torch'], '.2f')} | "
                     f"{_f(plain)} | {_f(r['t_run'])} | {_f(r['overhead'], '.2f')} | {_f(r['t_run_streaming'])} | "
                     f"{_f(r['overhead_streaming'], '.2f')} |")
    mt = results["metrics"]
    lines += ["", "## Metrics (float32 pairs, one pass, float64 accumulation)", "",
              "| elements | data GB | tensor_metrics GB/s (goal >= 2) | numpy abs(b-a).max GB/s | metrics / numpy time | "
              "precision_budget GB/s (f64 truth + 2 f32) |", "|---|---|---|---|---|---|",
              f"| {mt['numel']:,} | {_f(mt['pair_gb'])} | {_f(mt['metrics_gbps'], '.2f')} | {_f(mt['numpy_gbps'], '.2f')} | "
              f"{_f(mt['metrics_over_numpy'], '.2f')} | {_f(mt['budget_gbps'], '.2f')} |"]
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
        print(json.dumps(full_child(argv[1], argv[2], argv[3])))
        return 0
    if argv[:1] == ["--_attn-child"]:
        print(json.dumps(attention_child(argv[1], int(argv[2]))))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", help="comma-separated components (default: every registered one)")
    parser.add_argument("--quick", action="store_true", help="small data, one repetition (about a minute)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, help="timed repetitions per measurement (median; default 5, quick 3)")
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

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from parity import registry

    names = args.components.split(",") if args.components else registry.available()
    repeat = args.repeat or (3 if args.quick else 5)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "dtype": args.dtype, "repeat": repeat}
    print("benchmarking ...", file=sys.stderr)
    if args.attention or args.attention_only:
        results["attention"] = bench_attention(ATTENTION_TOKENS)
    if args.attention_only:
        print("\n".join(render_attention(results["attention"])))
        return 0
    components = [registry.get(name) for name in names]
    if not args.no_stack:  # a workload big enough for the per-run fixed costs not to dominate
        components.append(stack_component(8, 1024, 512) if args.quick else stack_component(8, 2048, 1024))
    results["components"] = bench_components(components, args.dtype, repeat)
    results["metrics"] = bench_metrics(8_000_000 if args.quick else 64_000_000, repeat)
    if not args.no_rss:
        tokens, width = (16384, 128) if args.quick else (65536, 128)
        results["rss_tensor_mb"] = tokens * width * 4 / 2**20
        results["rss"] = bench_rss([10, 40], tokens, width)
    if args.full:
        configs = dict(FULL_CONFIGS)
        for item in args.full_config:
            name, _, path = item.partition("=")
            if not path:
                parser.error(f"--full-config expects COMPONENT=CONFIG, got {item!r}")
            configs[name] = path
        results["full"] = bench_full(configs, args.dtype)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
