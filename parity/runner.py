"""The run pipeline: prepare both sides, run them, judge, add sections, write the report.

    prepare()      config validated, reference built (or a checkpoint loaded), weights converted,
                   MLX model built, inputs drawn -- every input error is raised here, before
                   anything runs or is written
    run_sides()    truth (bf16 runs: the reference in float64), reference, then MLX; in memory,
                   or streamed to disk and judged as each MLX tensor arrives; a forward that
                   raises is recorded as a crash (a parity failure), not re-raised
    compare()      the one verdict (:mod:`parity.compare`)
    sections       the component's views (from the captures) and extra runs (need the models)
    finish_run()   report.json / report.csv, dumps and manifest (:mod:`parity.report`, :mod:`parity.dumps`)

``parity run``, ``parity gate``, ``parity baseline save``, the pytest plugin, ``dump-ref`` (the
reference half) and ``compare --ref-bundle`` (the MLX half against stored tensors) all go
through these functions.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
import time
import traceback
from functools import cache
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from parity import calibration, invariance, registry, threads
from parity import thresholds as thresholds_mod
from parity.capture import Capture
from parity.compare import FAIL, Comparison, Crash, Judge, LayerResult, compare
from parity.component import Component, RunContext, Section
from parity.config import merge
from parity.dumps import discard_if_empty, mark_complete, mark_incomplete, new_run_dir, writable_folder
from parity.progress import SILENT, Progress
from parity.report import build_report, terminal_summary, write_report_dir
from parity.streaming import StreamCapture, StreamJudge, spool_dir, stats_predicate
from parity.vocab import DTYPES, SECOND_CALL, TRUTH_DTYPE, InputError
from parity.weights import WeightLoadError, read_checkpoint, select_prefix

REPO = Path(__file__).resolve().parent.parent
#: What ``keep_tensors`` may be: every tensor, those of failing layers, none (statistics and report only).
KEEP_TENSORS = ("all", "failing", "none")


def check_seed(seed: Any, option: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"{option}: expected a non-negative integer, got {seed!r}")
    return seed


def check_dtype(dtype: Any) -> str:
    if dtype not in DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def variant(component: Component, overrides: Mapping[str, Any] | None) -> str:
    """The run's name: the component, with its config overrides (``scheduler[shift=12]``)."""
    if not overrides:
        return component.name
    parts = ",".join(f"{k}={_short(v)}" for k, v in sorted(overrides.items()))
    return f"{component.name}[{parts}]"


def _short(value: Any) -> str:
    text = str(value).replace(" ", "")
    return text if len(text) <= 24 else text[:21] + "..."


def _free(path: Path) -> Path:
    """``path``, or ``path~2``, ``path~3``... when a run folder already holds one of that name."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}~{n}")
    return candidate


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+\[\]-]", "_", text)


@dataclass
class Setup:
    """One component, ready to run in one dtype: validated config, inputs, and the sides' models."""

    component: Component
    config: Any
    seed: int
    dtype: str
    inputs: dict[str, Any]
    reference: Any
    mlx_model: Any
    weights_source: str
    name: str
    started: float
    hooks: Any = None
    alignment: Any = None
    #: The converted weights, kept in a float32 run of a component with chunk plans (invariance rebuilds the model).
    weights: dict[str, Any] | None = None


def prepare(component: str | Component, dtype: str = "float32", seed: int = 0, config_path: str | Path | None = None,
            weights_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
            reference: bool = True, mlx: bool = True, weights: dict[str, Any] | None = None,
            config: Any = None, progress: Progress = SILENT) -> Setup:
    """Validate and build everything a run needs; raises :class:`~parity.vocab.InputError` on bad input.

    ``reference`` / ``mlx``: which sides to build (a bundle needs one each). ``weights``: a state
    dict to use instead of random init or ``weights_path`` (a bundle's); ``config``: an already
    validated config (a bundle's).
    """
    started = time.perf_counter()
    comp = registry.get(component)
    check_dtype(dtype)
    check_seed(seed)
    config = config if config is not None else comp.load_config(config_path, overrides)
    say = f"[{variant(comp, overrides)} {dtype}]"
    progress.step(f"{say} building the reference and converting weights")
    ref_model = None
    if weights is not None:
        source = "reference bundle"
    elif weights_path:
        weights = select_prefix(read_checkpoint(weights_path), comp.weights_prefix)
        source = str(weights_path)
    else:
        source = f"random init, seed {seed}"
    if reference or weights is None:
        if weights is not None:
            ref_model = comp.load_reference(config, weights) if reference else None
        else:
            ref_model = comp.build_reference(config, seed)
            weights = comp.reference_weights(ref_model)
    threads.apply(parameters=sum(int(getattr(v, "size", 0)) for v in weights.values()))
    if mlx:
        threads.advise_once()  # one line, once, when MLX's float32 GEMM is the slow reference BLAS
    converted = _converted(comp, weights) if mlx else None
    mlx_model = comp.build_mlx(config, converted, dtype) if mlx else None
    hooks, alignment = comp.run_hooks(weights)
    inputs = comp.make_inputs(config, seed)
    planned = mlx and len(invariance.plans(comp, config)) > 1 and dtype == "float32"
    return Setup(comp, config, seed, dtype, inputs, ref_model if reference else None, mlx_model, source,
                 variant(comp, overrides), started, hooks, alignment, converted if planned else None)


def judge_for(setup: Setup, thresholds: thresholds_mod.Thresholds,
              calibration_dir: str | Path | None = calibration.DEFAULT_DIR) -> tuple[Judge, dict[str, Any] | None]:
    """The run's judge: thresholds, alignment, attention key groups, and the per-layer limits of a
    calibration of this component, dtype and config in ``calibration_dir`` (None: none); and what to
    say of the calibration in the report."""
    comp = setup.component
    found, note = calibration.for_run(comp.name, setup.dtype, setup.config.to_dict(), calibration_dir)
    judge = Judge(comp.lineage(), setup.dtype, thresholds, setup.alignment, found.limits() if found else {},
                  comp.attention_groups(setup.config))
    if found is not None:
        return judge, {"path": str(found.path), "seeds": len(found.seeds), "layers": len(found.layers),
                       "rule": calibration.RULE[setup.dtype]}
    return judge, {"note": note} if note else None


def _converted(comp: Component, weights: dict[str, Any]) -> dict[str, Any]:
    """The port's weight converter applied; its own errors become one line naming the component."""
    try:
        return comp.convert_weights(weights)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's converter: name it
        raise WeightLoadError(f"{comp.name}: the weight converter rejected the reference's state dict: "
                              f"{type(err).__name__}: {err}") from err


# --- running the sides ------------------------------------------------------------------------

def _forward(side: str, capture: Capture, run: Callable[[], None]) -> Crash | None:
    """Run one side's forward; an exception inside it is a crash (a parity failure), returned, not raised."""
    try:
        run()
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - the forward of a port or reference: a parity failure
        return Crash(side, f"{type(err).__name__}: {err}", traceback.format_exc(), capture.last)
    return None


def run_reference(setup: Setup, dtype: str, capture: Capture, inputs: Mapping[str, Any] | None = None) -> Crash | None:
    """The reference in ``dtype`` (``float64``: the truth) into ``capture``, on ``inputs`` (default: the setup's)."""
    import torch

    comp = setup.component

    def run() -> None:
        with torch.no_grad():
            comp.run_reference(comp.cast_reference(setup.reference, dtype), inputs or setup.inputs, dtype, capture)
    return _forward("reference" if dtype != TRUTH_DTYPE else "float64 reference", capture, run)


def run_mlx(setup: Setup, capture: Capture, inputs: Mapping[str, Any] | None = None) -> Crash | None:
    """The MLX side into ``capture`` (taps, or hooks by module path), on ``inputs`` (default: the setup's)."""
    comp = setup.component

    def run() -> None:
        with comp.mlx_capture(setup.mlx_model, capture, setup.hooks):
            comp.run_mlx(setup.mlx_model, inputs or setup.inputs, setup.dtype)
    return _forward("MLX", capture, run)


@dataclass
class Sides:
    ref: Capture
    mlx: Capture
    truth: Capture | None
    judged: dict[str, LayerResult]
    crashes: list[Crash]


def run_sides(setup: Setup, judge: Judge, streaming: bool = False, spool: Path | None = None,
              stats_only: Sequence[str] | None = None, ref: Capture | None = None, truth: Capture | None = None,
              keep_mlx: bool = True, progress: Progress = SILENT, float64_truth: bool = True) -> Sides:
    """Run the sides a comparison needs; ``ref`` / ``truth`` given (a bundle): only the MLX side runs.

    ``streaming``: tensors go to ``spool/<side>/`` as captured and each MLX tensor is judged as it
    arrives; ``keep_mlx`` False writes no MLX tensor (statistics only, when nothing reads them);
    ``float64_truth`` False skips the truth run of a reduced-precision run (no precision budget).
    """
    label = f"[{setup.name} {setup.dtype}]"
    keep = stats_predicate(stats_only)
    crashes: list[Crash] = []

    def capture(side: str) -> Capture:
        if streaming:
            return StreamCapture(side, spool / side, keep)
        return Capture(side)

    if ref is None:
        if setup.dtype != "float32" and float64_truth:
            truth = capture("truth")
            with progress.counter(f"{label} float64 reference") as count:
                truth.observers.append(count)
                crashes += filter(None, [run_reference(setup, TRUTH_DTYPE, truth)])
        ref = capture("ref")
        with progress.counter(f"{label} reference") as count:
            ref.observers.append(count)
            crashes += filter(None, [run_reference(setup, setup.dtype, ref)])
    judged: dict[str, LayerResult] = {}
    if streaming:
        stream_judge = StreamJudge(judge, ref, truth, keep)
        mlx = stream_judge.capture(spool / "mlx" if keep_mlx else None)
        judged = stream_judge.judged
    else:
        mlx = Capture("mlx")
    with progress.counter(f"{label} MLX", total=len(ref) or None) as count:
        mlx.observers.append(count)
        crashes += filter(None, [run_mlx(setup, mlx)])
    return Sides(ref, mlx, truth, judged, crashes)


@dataclass
class SecondCall:
    """The second call's judged layers (named ``call2/...``), its captures and its crash, if any."""

    layers: list[LayerResult]
    ref: Capture
    mlx: Capture
    crash: Crash | None


def second_call(setup: Setup, judge: Judge, progress: Progress = SILENT, ref: Capture | None = None,
                inputs: Mapping[str, Any] | None = None) -> SecondCall:
    """Call the same MLX model object again, on the component's :meth:`~parity.component.Component.second_inputs`,
    and judge it against the reference's answer for those inputs.

    A port that keeps state between calls (a value cached at the first call, a feature cache or a
    step counter never reset) passes a single call and fails here, at ``call2/<layer>``. ``ref`` and
    ``inputs`` given (a reference bundle of the second call, as ``parity mutate`` makes): the
    reference does not run.
    """
    if inputs is None:
        inputs = setup.component.second_inputs(setup.config, setup.seed)
    mlx = Capture("mlx")
    progress.step(f"[{setup.name} {setup.dtype}] second call")
    if ref is None:
        ref = Capture("ref")
        crash = run_reference(setup, setup.dtype, ref, inputs) or run_mlx(setup, mlx, inputs)
    else:
        crash = run_mlx(setup, mlx, inputs)
    if crash is not None and crash.after:
        crash.after = SECOND_CALL + crash.after
    judged = compare(setup.component.name, setup.dtype, ref, mlx, judge.thresholds, judge.alignment,
                     crash=crash, lineage=judge.lineage, partial=True, calibrated=judge.calibrated,
                     key_groups=judge.key_groups)
    layers = [replace(l, name=SECOND_CALL + l.name, mlx_name=SECOND_CALL + l.mlx_name) for l in judged.layers]
    return SecondCall(layers, ref, mlx, crash)


def second_call_skipped(setup: Setup, streaming: bool, crashed: bool) -> str | None:
    """Why this run makes no second call (None: it makes one). Float32 runs in memory whose first
    call got through make one: state between calls is a property of the code, not of the precision,
    and a crashed first call has already said what is wrong."""
    if not setup.component.second_call:
        return f"{setup.component.name} declares none"
    if setup.dtype != "float32":
        return "made in float32 runs only"
    if streaming:
        return "not made in streaming runs"
    return "the first call crashed" if crashed else None


def _merge_second_call(second: SecondCall, comparison: Comparison, context: RunContext) -> list[Crash]:
    """The second call's layers after the first call's (so they are the first divergence only when
    the first call is clean), and its tensors in the run's captures (dumped under ``call2/``)."""
    comparison.layers += second.layers
    for capture, extra in ((context.ref, second.ref), (context.mlx, second.mlx)):
        for name in extra.order:
            capture.add(SECOND_CALL + name, extra[name])
    if second.crash is not None and comparison.crash is None:
        comparison.crash = second.crash
    return [second.crash] if second.crash else []


def sections(setup: Setup, context: RunContext, crashed: bool, extra_runs: bool = True) -> list[Section]:
    """The component's views and (with the models at hand) extra runs; a section that raises is reported as failed."""
    comp = setup.component
    out: list[Section] = []
    producers = [("views", comp.views)] + ([("extra runs", comp.extra_runs)] if extra_runs else [])
    if setup.weights is not None and setup.dtype == "float32":
        producers.append(("invariance", lambda run: invariance.sections(
            comp, run.config, run.seed, run.inputs, setup.weights, setup.hooks, run.thresholds)))
    for kind, produce in producers:
        try:
            out += produce(context)
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - a section must not take the report down
            note = f"{type(err).__name__}: {err}"
            out.append(Section(f"{kind.replace(' ', '_')}_error", f"{comp.name} {kind} could not be computed",
                               "table", {"columns": ["error"], "rows": [[note]]},
                               passed=None if crashed else False, note=note))
    return out


# --- one component run ----------------------------------------------------------------------

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
    overrides: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    thresholds: thresholds_mod.Thresholds | None = None,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    streaming: bool = False,
    stats_only: Sequence[str] | None = None,
    keep_tensors: str = "all",
    analyses: bool = True,
    calibration_dir: str | Path | None = calibration.DEFAULT_DIR,
    explain: bool = True,
) -> RunResult:
    """Compare one component in ``dtype``; write ``<run_dir>/<component>-<dtype>/`` unless ``out_dir`` is None.

    bfloat16 runs also run the reference in float64 (the truth the precision budget is judged on).
    ``streaming=True`` keeps no tensor in memory: each one is written to the report folder (a
    temporary folder when ``out_dir`` is None) as it is captured, and each MLX tensor is judged as
    it arrives. ``stats_only`` (globs on reference layer names; implies streaming) keeps only
    statistics and a small sample of those layers. ``keep_tensors``: which tensors the report
    folder keeps (all, failing layers only, none). ``calibration_dir``: where ``parity calibrate``
    wrote per-layer limits (used when recorded for this config; None: global limits only).
    ``analyses`` False leaves out what the verdict does not need (the float64 truth of a bf16 run,
    the component's sections: views and extra runs such as drift): the capture-and-compare part
    alone, as ``bench/run_bench.py`` times it. ``explain``: test
    the catalog of known porting mistakes on the first divergence of a failing run (``explanation`` in the
    report, :mod:`parity.explain`; advice, it changes no verdict).
    """
    progress = progress or SILENT
    if keep_tensors not in KEEP_TENSORS:
        raise InputError(f"keep_tensors: expected one of {KEEP_TENSORS}, got {keep_tensors!r}")
    thresholds = thresholds or thresholds_mod.load()
    setup = prepare(name, dtype, seed, config_path, weights_path, overrides, progress=progress)
    comp = setup.component
    judge, calibrated = judge_for(setup, thresholds, calibration_dir)
    created = run_dir is None and out_dir is not None
    if out_dir is not None:
        run_dir = run_dir or new_run_dir(writable_folder(out_dir, "--out"))
    report_dir = _free(run_dir / _folder_name(f"{setup.name}-{dtype}")) if out_dir is not None else None
    try:
        streaming = streaming or bool(stats_only)
        spool, tmp = spool_dir(report_dir) if streaming else (None, None)
        sides = run_sides(setup, judge, streaming, spool, stats_only,
                          keep_mlx=report_dir is not None or comp.has_views() or comp.has_extra_runs(),
                          progress=progress, float64_truth=analyses)
        comparison = compare(comp.name, dtype, sides.ref, sides.mlx, thresholds, judge.alignment, sides.truth,
                             sides.judged, sides.crashes[0] if sides.crashes else None, judge.lineage,
                             calibrated=judge.calibrated, key_groups=judge.key_groups)
        context = RunContext(comp, setup.config, seed, dtype, setup.inputs, setup.reference, setup.mlx_model,
                             sides.ref, sides.mlx, sides.truth, thresholds, extra={"spool": tmp},
                             comparison=comparison)
        comparison.sections = sections(setup, context, bool(sides.crashes)) if analyses else []
        skipped = second_call_skipped(setup, streaming, bool(sides.crashes))
        if skipped is None:
            sides.crashes += _merge_second_call(second_call(setup, judge, progress), comparison, context)
        meta = run_meta(setup, thresholds, sides.crashes, calibrated)
        meta["second_call"] = skipped or f"made: layers {SECOND_CALL}<layer>"
        meta["explanation"] = explanation(setup, judge, comparison, context, progress) if explain else None
        result = finish_run(comparison, context, meta, run_dir if out_dir is not None else None, report_dir,
                            keep_tensors, progress)
    except BaseException:
        if report_dir is not None:
            shutil.rmtree(report_dir, ignore_errors=True)
        if created:
            discard_if_empty(run_dir)
        raise
    if created:
        mark_complete(run_dir)
    return result


def explanation(setup: Setup, judge: Judge, comparison: Comparison, context: RunContext,
                progress: Progress = SILENT) -> dict[str, Any] | None:
    """The report's ``explanation`` of the first divergence (None: nothing diverged); advice, so an error in
    it is reported in it, never raised."""
    from parity.explain.run import ADVICE, explain_run

    if comparison.first_divergence is None:
        return None
    progress.step(f"[{setup.name} {setup.dtype}] explaining {comparison.first_divergence}")
    try:
        return explain_run(setup, judge, comparison, context, run_reference)
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - advice must not take the run down
        return {"advice": ADVICE, "layers": [], "error": f"{type(err).__name__}: {err}"}


def rebuild(report: Mapping[str, Any]) -> Setup:
    """The reference side of a finished run built again from its report (component, config, seed, weights), to
    re-run it (``parity explain``); an :class:`InputError` when it cannot be (a run against a reference bundle,
    a component not registered, a checkpoint gone)."""
    from parity.config import validate

    weights = str(report.get("weights") or "")
    if weights == "reference bundle":
        raise InputError("the run compared against a reference bundle")
    component = registry.get(str(report.get("component")))
    config = validate(component.config_model, report.get("config") or {}, {"report.json": report.get("config")})
    return prepare(component, str(report.get("dtype")), check_seed(report.get("seed", 0)), config=config, mlx=False,
                   weights_path=None if weights.startswith("random init") else weights)


def run_meta(setup: Setup, thresholds: thresholds_mod.Thresholds, crashes: Sequence[Crash] = (),
             calibrated: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata block of a report."""
    return {
        "variant": setup.name,
        "lineage": setup.component.lineage(),
        "config": setup.config.to_dict(),
        "seed": setup.seed,
        "weights": setup.weights_source,
        "versions": versions(),
        "threads": threads.current(),
        "git_commit": git_commit(),
        "thresholds": [str(p) for p in thresholds.paths],
        "calibration": calibrated,
        "crashes": [vars(c) for c in crashes],
        "seconds": round(time.perf_counter() - setup.started, 3),
    }


def finish_run(comparison: Comparison, context: RunContext, meta: dict[str, Any], run_dir: Path | None,
               report_dir: Path | None, keep_tensors: str = "all", progress: Progress = SILENT) -> RunResult:
    """Build the report; with a ``report_dir``, write it and the dumps there."""
    report = build_report(comparison, meta)
    if report_dir is not None:
        report["run_id"] = run_dir.name
        report["report_dir"] = str(report_dir)
        failing = {l.name for l in comparison.layers if l.verdict == FAIL} | \
                  {l.mlx_name for l in comparison.layers if l.verdict == FAIL}
        keep = {"all": None, "failing": lambda side, layer: layer in failing, "none": lambda side, layer: False}[keep_tensors]
        write_report_dir(report_dir, report, {"ref": context.ref, "mlx": context.mlx, "truth": context.truth}, keep)
    progress.step(terminal_summary(report))
    return RunResult(comparison, report, report_dir, context)


def run_many(
    names: Iterable[str | Component],
    dtypes: Iterable[str] = DTYPES,
    out_dir: str | Path = "reports",
    progress: Progress | None = None,
    on_error: Callable[[str, str, BaseException], None] | None = None,
    config_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    coverage: bool = False,
    **kwargs: Any,
) -> list[RunResult]:
    """Run several components and dtypes into one new run folder.

    ``coverage``: each component's coverage cells too, in float32, after its own runs (variants
    named by their overrides). Configs are validated for every run before the folder is created.
    A run that raises an input error stops everything, unless ``on_error(name, dtype, error)`` is
    given (``name``: the variant): then it is told and the other runs go on. An interrupted run
    folder stays, marked incomplete.
    """
    components = [registry.get(n) for n in names]
    plan = []
    for comp in components:
        plan += [(comp, dtype, overrides) for dtype in dtypes]
        plan += [(comp, "float32", merge(overrides or {}, cell)) for cell in (comp.coverage if coverage else ())]
    for comp, _dtype, cell_overrides in plan:
        comp.load_config(config_path, cell_overrides)
    run_dir = new_run_dir(writable_folder(out_dir, "--out"))
    results = []
    try:
        for comp, dtype, cell_overrides in plan:
            try:
                results.append(run_component(comp, dtype, out_dir=out_dir, run_dir=run_dir, progress=progress,
                                             config_path=config_path, overrides=cell_overrides, **kwargs))
            except Exception as err:  # noqa: BLE001 - handed to the caller
                if on_error is None:
                    raise
                on_error(variant(comp, cell_overrides), dtype, err)
    except KeyboardInterrupt:
        mark_incomplete(run_dir, "interrupted")
        raise
    except BaseException as err:
        if not discard_if_empty(run_dir):
            mark_incomplete(run_dir, f"stopped: {type(err).__name__}: {err}")
        raise
    mark_complete(run_dir)
    return results


# --- metadata -----------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("mlx.core", "torch", "diffusers", "numpy"):
        try:
            found[module.split(".")[0]] = __import__(module, fromlist=["__version__"]).__version__
        except (ImportError, AttributeError):
            found[module.split(".")[0]] = "unavailable"
    found["mlx_blas"] = mlx_blas()
    return found


def mlx_blas() -> str:
    """The BLAS behind MLX's float32 CPU matmuls and convolutions (see :mod:`parity.threads`)."""
    return threads.mlx_blas()


@cache
def git_commit() -> str | None:
    """The commit of the harness checkout (with ``-dirty`` if it has uncommitted changes); asked once per process."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")
