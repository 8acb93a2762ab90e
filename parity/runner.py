"""Run a component on both sides, compare, and write dumps and reports."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from parity import component as registry
from parity import thresholds as thresholds_mod
from parity.capture import Capture
from parity.compare import Comparison, LayerResult, compare
from parity.component import Component, RunContext, Section
from parity.dumps import layer_file, new_run_dir, write_json, write_npy
from parity.report import build_report, terminal_summary, write_reports
from parity.weights import read_checkpoint, select_prefix

Progress = Callable[[str], None]
REPO = Path(__file__).resolve().parent.parent


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RunResult:
    """The outcome of one component run in one dtype."""

    comparison: Comparison
    report: dict[str, Any]
    report_dir: Path | None
    context: RunContext

    @property
    def verdict(self) -> str:
        return self.comparison.verdict

    @property
    def first_divergence(self) -> str | None:
        return self.comparison.first_divergence

    @property
    def layers(self) -> list[LayerResult]:
        return self.comparison.layers

    @property
    def sections(self) -> list[Section]:
        return self.comparison.sections

    def layer(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the {self.comparison.component} comparison")


def run_component(
    name: str | Component,
    dtype: str = "float32",
    seed: int = 0,
    out_dir: str | Path | None = "reports",
    overrides: dict[str, Any] | None = None,
    config_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    thresholds: thresholds_mod.Thresholds | None = None,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    streaming: bool = False,
    stats_only: Sequence[str] | None = None,
) -> RunResult:
    """Compare one component in ``dtype``; write ``<run_dir>/<component>-<dtype>/`` unless ``out_dir`` is None.

    bfloat16 runs also run the reference in float64 (the truth the precision budget is judged on).

    ``streaming=True`` keeps no tensor in memory: each one is written to the report folder (a
    temporary folder when ``out_dir`` is None) as it is captured, and each MLX tap is judged as
    it arrives against the reference read back from disk. ``stats_only`` (globs on reference
    layer names; implies streaming) keeps only statistics and a small sample of those layers.
    Same verdicts, metrics and report format; see ``parity.streaming``.
    """
    comp = registry.get(name) if isinstance(name, str) else name
    if dtype not in registry.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {registry.DTYPES}")
    say = progress or (lambda _m: None)
    thresholds = thresholds or thresholds_mod.load()
    config = comp.load_config(config_path)
    config = {**config, **(overrides or {})}
    started = time.perf_counter()

    say(f"[{comp.name} {dtype}] building reference and converting weights")
    if weights_path:
        weights = select_prefix(read_checkpoint(weights_path), comp.weights_prefix)
        reference = comp.load_reference(config, weights)
    else:
        reference = comp.build_reference(config, seed)
        weights = comp.reference_weights(reference)
    mlx_model = comp.build_mlx(config, weights, dtype)
    inputs = comp.make_inputs(config, seed)
    del weights  # converted into both models; a full-size checkpoint should not stay in memory twice

    if streaming or stats_only:
        from parity import streaming as stream

        created_run_dir = out_dir is not None and run_dir is None
        if out_dir is not None:
            run_dir = run_dir or new_run_dir(out_dir)
        report_dir = run_dir / f"{comp.name}-{dtype}" if out_dir is not None else None
        spool, tmp = stream.spool_dir(report_dir)
        keep = stream.stats_predicate(stats_only)
        try:
            truth = None
            if dtype != "float32":
                say(f"[{comp.name} {dtype}] reference in float64 (truth), streamed to disk")
                truth = stream.run_reference_side(comp, reference, inputs, "float64", spool / "truth", keep)
            say(f"[{comp.name} {dtype}] reference in {dtype}, streamed to disk")
            ref = stream.run_reference_side(comp, reference, inputs, dtype, spool / "ref", keep)
            say(f"[{comp.name} {dtype}] MLX in {dtype}, each layer judged as it arrives")
            keep_mlx = report_dir is not None or stream.needs_mlx_tensors(comp)
            mlx, judged = stream.run_mlx_side(comp, mlx_model, inputs, dtype, ref, truth, thresholds,
                                              spool / "mlx" if keep_mlx else None, keep)
            stream.keep_alive([ref, mlx, truth], tmp)
            comparison = compare(comp.name, dtype, ref, mlx, thresholds, comp.alignment, truth, judged=judged)
        except BaseException:
            if report_dir is not None:
                shutil.rmtree(report_dir, ignore_errors=True)
                if created_run_dir:
                    shutil.rmtree(run_dir, ignore_errors=True)
            raise
    else:
        truth = None
        if dtype != "float32":
            say(f"[{comp.name} {dtype}] reference in float64 (truth)")
            truth = _run_reference(comp, reference, inputs, "float64")
        say(f"[{comp.name} {dtype}] reference in {dtype}")
        ref = _run_reference(comp, reference, inputs, dtype)
        say(f"[{comp.name} {dtype}] MLX in {dtype}")
        mlx = Capture("mlx")
        comp.run_mlx(mlx_model, inputs, dtype, mlx)
        comparison = compare(comp.name, dtype, ref, mlx, thresholds, comp.alignment, truth)

    context = RunContext(comp, config, seed, dtype, inputs, reference, mlx_model, ref, mlx, truth, thresholds)
    comparison.sections = comp.sections(context)
    weights_note = str(weights_path) if weights_path else f"random init, seed {seed}"
    return finish_run(comparison, context, run_meta(config, seed, weights_note, started), out_dir, run_dir, say)


def run_meta(config: dict[str, Any], seed: int, weights: str, started: float) -> dict[str, Any]:
    """The metadata block of a report (``started``: ``time.perf_counter()`` at the start of the run)."""
    return {
        "config": config,
        "seed": seed,
        "weights": weights,
        "versions": versions(),
        "git_commit": git_commit(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def finish_run(comparison: Comparison, context: RunContext, meta: dict[str, Any], out_dir: str | Path | None,
               run_dir: Path | None, progress: Progress | None = None) -> RunResult:
    """Build the report; unless ``out_dir`` is None, write it and the dumps to ``<run_dir>/<component>-<dtype>/``."""
    report = build_report(comparison, meta)
    report_dir = None
    if out_dir is not None:
        run_dir = run_dir or new_run_dir(out_dir)
        report_dir = run_dir / f"{comparison.component}-{comparison.dtype}"
        report["run_id"] = run_dir.name
        report["report_dir"] = str(report_dir)
        write_dumps(report_dir, report, {"ref": context.ref, "mlx": context.mlx, "truth": context.truth})
        write_reports(report_dir, report)
    if progress:
        progress(terminal_summary(report))
    return RunResult(comparison, report, report_dir, context)


def _run_reference(comp: Component, reference: Any, inputs: dict, dtype: str, capture: Capture | None = None) -> Capture:
    """Run the reference in ``dtype`` into ``capture`` (a new in-memory one by default)."""
    import torch

    capture = capture if capture is not None else Capture("ref" if dtype != "float64" else "truth")
    with torch.no_grad():
        comp.run_reference(comp.cast_reference(reference, dtype), inputs, dtype, capture)
    return capture


def write_dumps(directory: Path, report: dict[str, Any], captures: dict[str, Capture | None]) -> None:
    """Write each captured tensor as ``<side>/<layer>.npy`` and a ``manifest.json`` describing them."""
    sides = {}
    for side, capture in captures.items():
        if capture is None:
            continue
        if hasattr(capture, "dump_entry"):  # a streamed capture: its tensors are on disk already
            sides[side] = capture.dump_entry(directory, side)
            continue
        files = {}
        for layer in capture.order:
            relative = f"{side}/{layer_file(layer)}"
            if layer in capture.tensors:
                write_npy(directory / relative, capture.tensors[layer])
                files[layer] = relative
        sides[side] = {
            "layer_order": capture.order,
            "files": files,
            "shapes": {k: list(v) for k, v in capture.shapes.items()},
            "dtypes": capture.dtypes,
        }
    manifest = {k: report[k] for k in ("component", "dtype", "config", "seed", "weights", "versions", "git_commit", "run_id")}
    write_json(directory / "manifest.json", {**manifest, "sides": sides})


def run_many(
    names: Iterable[str],
    dtypes: Iterable[str] = ("float32",),
    out_dir: str | Path = "reports",
    progress: Progress | None = stderr_progress,
    on_error: Callable[[str, str, Exception], None] | None = None,
    **kwargs: Any,
) -> list[RunResult]:
    """Run several components and dtypes into one new run directory.

    A run that raises stops everything, unless ``on_error(name, dtype, error)`` is given: then it
    is told and the other runs go on (the failed run has no result).
    """
    run_dir = new_run_dir(out_dir)
    results = []
    for name in names:
        for dtype in dtypes:
            try:
                results.append(run_component(name, dtype, out_dir=out_dir, run_dir=run_dir, progress=progress, **kwargs))
            except Exception as err:  # noqa: BLE001 - handed to the caller
                if on_error is None:
                    raise
                on_error(name, dtype, err)
    return results


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("mlx", "torch", "diffusers", "numpy"):
        try:
            found[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            found[module] = "unavailable"
    if found["mlx"] == "unavailable":
        try:
            import mlx.core as mx

            found["mlx"] = mx.__version__
        except ImportError:
            pass
    found["mlx_blas"] = mlx_blas()
    return found


def mlx_blas() -> str:
    """The BLAS behind MLX's float32 CPU matmuls and convolutions.

    Linux ``mlx[cpu]`` wheels bundle the netlib reference BLAS, ~30x slower than OpenBLAS at
    float32 GEMM; preloading OpenBLAS (``LD_PRELOAD=.../libopenblas.so.0``) replaces it.
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


def git_commit() -> str | None:
    """The commit of the harness checkout (with ``-dirty`` if it has uncommitted changes)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")
